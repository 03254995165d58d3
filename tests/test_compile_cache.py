"""The persistent compilation cache: a second process start compiles nothing it compiled before."""

import os
import subprocess
import sys

import pytest

from stlm.train import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Counts the cache's own monitoring events in a fresh process (JAX reads the cache setting
# once per process, at its first compilation).
_CHILD = r'''
import sys
import jax, jax.numpy as jnp
from stlm.train import compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
compile_cache.enable(sys.argv[1])
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
f(jnp.ones((8, 4))).block_until_ready()
print('hits', events.count('/jax/compilation_cache/cache_hits'),
      'misses', events.count('/jax/compilation_cache/cache_misses'))
'''


def _start(cache_dir):
  out = subprocess.run([sys.executable, '-c', _CHILD, cache_dir], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), check=True)
  words = out.stdout.split()
  return int(words[words.index('hits') + 1]), int(words[words.index('misses') + 1])


@pytest.mark.slow
def test_second_start_hits_the_cache(tmp_path):
  cache_dir = str(tmp_path / 'cache')
  hits, misses = _start(cache_dir)
  assert hits == 0 and misses >= 1
  assert os.listdir(cache_dir)          # small CPU programs are written too
  hits, misses = _start(cache_dir)
  assert hits >= 1 and misses == 0


def test_resolve_dir(monkeypatch, tmp_path):
  assert compile_cache.resolve_dir('') is None
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert compile_cache.resolve_dir('auto') == str(tmp_path / 'stlm' / 'jax_compile')
  assert compile_cache.resolve_dir(str(tmp_path / 'x')) == str(tmp_path / 'x')
