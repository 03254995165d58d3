"""Persistent XLA compilation cache, so a resumed or repeated run starts without recompiling.

`config.train.compile_cache_dir`: 'auto' = a per-user cache directory
($XDG_CACHE_HOME/stlm/jax_compile, else ~/.cache/stlm/jax_compile), shared by every run of
the user so that a new workdir with the same shapes also hits; '' = off; else a path.
JAX reads the setting at the first compilation of the process, so `enable` must run before
anything is jitted (stlm.train.loop.train calls it first).
"""

import os

import jax


def resolve_dir(setting: str) -> str | None:
  """The cache directory a `train.compile_cache_dir` value names (None = off)."""
  if not setting:
    return None
  if setting == 'auto':
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'stlm', 'jax_compile')
  return os.path.abspath(os.path.expanduser(setting))


def enable(setting: str) -> str | None:
  """Turns the persistent cache on for this process; returns its directory (None = off)."""
  path = resolve_dir(setting)
  if path is None:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  # JAX's defaults skip programs that compile in under 1 s: on CPU that is most of a small
  # run's programs (init, eval, the tiny train step), so cache everything.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  return path
