"""Checkpoints and exports written by earlier code still load, score and resume the same way.

tests/fixtures/compat/<name>/ holds tiny runs trained by the commit named in their
command.json (tests/fixtures/make_compat_fixture.py wrote them, and says how): the run's
workdir, the command that trained it, and that commit's numbers in expected.npz. Each run is
loaded with today's code and must featurize a fixed text into the same batch, give the same
per-target log-probabilities for it, and resume its checkpoint for one more step with the
config that trained it (the config file and overrides main.py was given).

The forward runs on the CPU whatever the default device: the numbers were written on a CPU,
and an accelerator's matmuls round differently.
"""

import hashlib
import importlib
import json
import math
import os
import pathlib
import shutil

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from stlm import export
from stlm.data import corpus
from stlm.train import loop

COMPAT_DIR = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'compat'
NAMES = ('baseline', 'byte_pool_v2', 'byte_pool_paper', 'encoder', 'ffn_sharing_lora')

# The log-probabilities are compared to RTOL/ATOL, not bit for bit: on the machine that wrote
# them the writing code reproduces them exactly, but XLA's CPU code generation follows the
# host's vector width, so another CPU may round a sum differently by a few float32 units in
# the last place, which this covers. Any change to the weights, their layout or the maths
# moves them by far more (test_tolerance_detects_a_changed_weight).
RTOL = ATOL = 1e-6
# The weight change that test_tolerance_detects_a_changed_weight must see.
PERTURBATION = 1.001
# The resumed step's loss went through a backward pass and an optimizer update first, which
# amplifies last-place differences a little.
LOSS_RTOL = 1e-5


# Each forward and each resume compiles a program: the fast loop (-m 'not slow') scores the
# two kinds the configs default to and resumes the baseline; the full suite does all of them.
SCORED_FAST = ('baseline', 'byte_pool_v2')
RESUMED_FAST = ('baseline',)


def cases(fast: tuple[str, ...]) -> list:
  return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]


def fixture_dir(name: str) -> pathlib.Path:
  return COMPAT_DIR / name


def expected(name: str) -> dict:
  with np.load(fixture_dir(name) / 'expected.npz') as f:
    return {k: f[k] for k in f.files}


def stored_batch(exp: dict) -> dict:
  return {k[len('batch.'):]: v for k, v in exp.items() if k.startswith('batch.')}


def fixed_batch(featurizer, text: str) -> dict:
  """One row: the first window of `text`, laid out as the scorer lays out a span."""
  example = featurizer.document(text)[0]
  n = len(example['loss_mask'])
  if hasattr(featurizer, 'batch_spans'):   # a row layout of its own (the byte stream)
    return featurizer.batch_spans([(example, 0, n)], 1, n)
  batch = {k: np.asarray(v)[None] for k, v in example.items()}
  batch['segment_ids'] = np.ones((1, n), np.int32)
  batch['positions'] = np.arange(n, dtype=np.int32)[None]
  return batch


_LOADED = {}


def load(name: str):
  """(export, forward on the CPU) of a fixture, loaded once per test process."""
  if name not in _LOADED:
    exported = export.load_export(str(fixture_dir(name) / 'workdir' / 'export'))
    apply = jax.jit(lambda p, b: exported.model.apply({'params': p}, b, deterministic=True))

    def forward(params, batch):
      cpu = jax.devices('cpu')[0]
      with jax.default_device(cpu):
        return jax.device_get(apply(jax.device_put(params, cpu), jax.device_put(batch, cpu)))

    _LOADED[name] = exported, forward
  return _LOADED[name]


def test_every_fixture_is_present():
  assert sorted(p.name for p in COMPAT_DIR.iterdir() if p.is_dir()) == sorted(NAMES)
  for name in NAMES:
    command = json.loads((fixture_dir(name) / 'command.json').read_text())
    steps = command['steps']
    assert sorted(os.listdir(fixture_dir(name) / 'workdir' / 'checkpoints')) == [str(steps)]
    assert export.is_export(str(fixture_dir(name) / 'workdir' / 'export'))


@pytest.mark.parametrize('name', NAMES)
def test_export_featurizes_the_fixed_text_as_before(name):
  exp = expected(name)
  exported, _ = load(name)
  batch = fixed_batch(exported.featurizer, str(exp['text']))
  want = stored_batch(exp)
  assert sorted(batch) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(batch[key]), value, err_msg=f'{name}: {key}')


@pytest.mark.parametrize('name', cases(SCORED_FAST))
def test_export_scores_the_fixed_batch_as_before(name):
  exp = expected(name)
  exported, forward = load(name)
  out = forward(nn.unbox(exported.params), stored_batch(exp))
  real = exp['real']   # every real position (a masked LM scores unmasked ones too)
  assert real.sum() >= 8, 'the fixed batch scores too few positions to mean anything'
  got = np.asarray(out['logprobs'], np.float32)
  assert got.shape == exp['logprobs'].shape
  assert np.all(np.isfinite(got[real]))
  np.testing.assert_allclose(got[real], exp['logprobs'][real], rtol=RTOL, atol=ATOL,
                             err_msg=f'{name}: log-probabilities of the fixed batch changed')
  np.testing.assert_array_equal(np.asarray(out['units'])[real], exp['units'][real])
  np.testing.assert_array_equal(np.asarray(out['greedy'])[real], exp['greedy'][real])


@pytest.mark.parametrize('name', cases(SCORED_FAST))
def test_tolerance_detects_a_changed_weight(name):
  """Scaling the largest weight by PERTURBATION moves some log-probability beyond RTOL/ATOL."""
  exp = expected(name)
  exported, forward = load(name)
  params = nn.unbox(exported.params)
  leaves, treedef = jax.tree.flatten(params)
  biggest = max(range(len(leaves)), key=lambda i: np.size(leaves[i]))
  leaves[biggest] = leaves[biggest] * PERTURBATION
  out = forward(jax.tree.unflatten(treedef, leaves), stored_batch(exp))
  real = exp['real']
  got = np.asarray(out['logprobs'], np.float32)[real]
  want = exp['logprobs'][real]
  assert np.any(np.abs(got - want) > ATOL + RTOL * np.abs(want))


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """One prepared copy of the built-in corpus for every resumed run of this module."""
  return tmp_path_factory.mktemp('tfds')


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def builtin_corpus_sha256() -> str:
  return hashlib.sha256(json.dumps(corpus.builtin_documents()).encode()).hexdigest()


# Config-file defaults that changed since the fixture was written, with the values it ran
# with: resuming it names them, as a user resuming such a run would.
CHANGED_DEFAULTS = {
    'configs/byte_pool.py': {'model.byte_pool.decoder_context': 'window',
                             'model.byte_pool.condition_at': 'after_attention',
                             'model.byte_pool.pooling': 'mean'},
}


def run_config(command: dict, **changes) -> ml_collections.ConfigDict:
  """The config main.py builds from the command's config file and --config overrides (plus
  the fixture's values of defaults changed since)."""
  module = importlib.import_module(command['config'].removesuffix('.py').replace('/', '.'))
  config = module.get_config()
  pinned = CHANGED_DEFAULTS.get(command['config'], {})
  for key, value in {**pinned, **command['overrides'], **changes}.items():
    *path, last = key.split('.')
    node = config
    for part in path:
      node = node[part]
    node[last] = value
  return ml_collections.ConfigDict(config.to_dict())


@pytest.mark.parametrize('name', cases(RESUMED_FAST))
def test_checkpoint_resumes_for_one_more_step(name, tfds_dir, tmp_path):
  command = json.loads((fixture_dir(name) / 'command.json').read_text())
  steps = command['steps']
  workdir = tmp_path / 'workdir'
  shutil.copytree(fixture_dir(name) / 'workdir', workdir)
  # train.steps and data.data_dir are resumable keys: everything else is the fixture's config.
  loop.train(run_config(command, **{'train.steps': steps + 1, 'data.data_dir': str(tfds_dir)}),
             str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == sorted([str(steps), str(steps + 1)])
  rows = read_metrics(workdir)
  train = [r for r in rows if r['split'] == 'train']
  assert [r['step'] for r in train] == list(range(1, steps + 2))
  # A resumed run never evaluates the untrained step 0 again (a restart from scratch would).
  assert [r['step'] for r in rows if r['split'] == 'validation'] == [0, steps, steps + 1]
  loss = train[-1]['loss']
  assert math.isfinite(loss)
  exp = expected(name)
  if jax.default_backend() == 'cpu' and str(exp['corpus_sha256']) == builtin_corpus_sha256():
    # Same documents in the same order: restored params, optimizer state and data position
    # give the loss the writing commit saw on this step.
    assert loss == pytest.approx(float(exp['resume_loss']), rel=LOSS_RTOL)
  assert export.load_config(str(workdir / 'export')).train.steps == steps + 1
