"""Benchmarks during training: the same scores as stlm.eval, one compilation, checked inputs."""

import json
import types

import jax
import numpy as np
import pytest

from stlm import config as config_lib
from stlm import export
from stlm.config import validate
from stlm.data.featurize import TokenFeaturizer
from stlm.eval import zero_shot
from stlm.models import factory
from stlm.tokenizers import ByteTokenizer
from stlm.train import benchmarks
from tests.conftest import require_shared_data
from tests.main_runs import run_main

NAMES = 'blimp,arc_easy'
LIMIT = 12


def _config(data_dir, **train):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.update(vocab_size=257, max_len=128, num_layers=1)
  c.train.update({'eval_benchmarks': NAMES, 'eval_benchmarks_limit': LIMIT,
                  'final_eval_data_dir': str(data_dir), **train})
  return c


@pytest.fixture(scope='module')
def random_model():
  c = _config(require_shared_data() / 'benchmarks')
  model = factory.build_model(c.model)
  params = factory.init_params(model, c.model, jax.random.PRNGKey(0))
  tok = ByteTokenizer()
  return types.SimpleNamespace(model=model, params=params, config=c,
                               featurizer=TokenFeaturizer(tok, 128))


def test_scores_equal_the_evaluator_on_the_same_items_and_compile_once(random_model):
  r = random_model
  bench = benchmarks.InTrainingBenchmarks(r.config, r.model, r.featurizer, r.params)
  first = bench.evaluate(r.params)
  compiles = bench.scorer.compile_count
  want = zero_shot.run_benchmarks(r, NAMES, r.config.train.final_eval_data_dir, LIMIT)
  for name in NAMES.split(','):
    assert first[f'{name}/acc'] == want[name]['acc']
    assert first[f'{name}/acc_stderr'] == want[name]['acc_stderr']
    assert first[f'{name}/n'] == LIMIT
  for paradigm, g in want['blimp']['groups']['paradigm'].items():
    assert first[f'blimp/paradigm/{paradigm}/acc'] == g['acc']
  # Other parameters: other scores, the same compiled shapes, the same items.
  other = jax.tree.map(lambda x: x * 1.5 + 0.01, r.params)
  assert bench.measured_share is None   # nothing before the first evaluation to compare
  second = bench.evaluate(other)
  assert bench.scorer.compile_count == compiles
  assert 0 < bench.measured_share <= 1
  assert second['blimp/n'] == first['blimp/n']
  scored = zero_shot.run_benchmarks(types.SimpleNamespace(**{**vars(r), 'params': other}),
                                    NAMES, r.config.train.final_eval_data_dir, LIMIT)
  assert second['arc_easy/acc'] == scored['arc_easy']['acc']
  assert second['blimp/acc'] == scored['blimp']['acc']


def test_due_every_n_steps_and_at_the_end(random_model):
  c = random_model.config.copy_and_resolve_references()
  c.train.update(eval_every=7, steps=20, eval_benchmarks_every=0)
  assert benchmarks.every(c) == 7
  c.train.eval_benchmarks_every = 5
  bench = benchmarks.InTrainingBenchmarks(c, random_model.model, random_model.featurizer,
                                          random_model.params)
  assert [s for s in range(1, 21) if bench.due(s)] == [5, 10, 15, 20]
  c.train.eval_benchmarks = ''
  assert benchmarks.every(c) == 0


@pytest.mark.parametrize('change,match', [
    (dict(eval_benchmarks='blimp,nope'), r'^config\.train\.eval_benchmarks=.*Unknown benchmark\(s\) nope'),
    (dict(eval_benchmarks_limit=0), r'^config\.train\.eval_benchmarks_limit=0: must be >= 1'),
    (dict(eval_benchmarks_every=-1), r'^config\.train\.eval_benchmarks_every=-1'),
    (dict(final_eval_data_dir=''), r"^config\.train\.final_eval_data_dir='': train\.eval_benchmarks reads"),
    (dict(final_eval_data_dir='/nonexistent/benchmarks'), r'^config\.train\.eval_benchmarks=.*blimp'),
])
def test_bad_settings_are_config_errors_naming_the_key(change, match):
  c = _config('/work', **change)
  if 'final_eval_data_dir' not in change:
    c.train.final_eval_data_dir = str(require_shared_data() / 'benchmarks')
  with pytest.raises(validate.ConfigError, match=match):
    benchmarks.check(c)


def test_an_encoder_is_refused():
  c = _config(require_shared_data() / 'benchmarks')
  c.model.kind = 'encoder'
  with pytest.raises(validate.ConfigError, match=r'is not a causal language model'):
    benchmarks.check(c)


@pytest.mark.slow
def test_a_run_logs_learning_curves_that_match_the_evaluator(tmp_path):
  shared = require_shared_data()
  workdir = tmp_path / 'run'
  run_main('configs/baseline.py', workdir, '--config.data.source=local',
           f'--config.data.path={shared / "corpus" / "tinystories"}',
           f'--config.data.data_dir={tmp_path / "tfds"}', '--config.train.steps=4',
           '--config.train.warmup_steps=1', '--config.train.eval_every=2',
           '--config.train.log_every=1', f'--config.train.eval_benchmarks={NAMES}',
           f'--config.train.eval_benchmarks_limit={LIMIT}',
           f'--config.train.final_eval_data_dir={shared / "benchmarks"}')
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  bench = [r for r in rows if r['split'] == benchmarks.SPLIT]
  assert [r['step'] for r in bench] == [0, 2, 4]
  exported = export.load_export(str(workdir / 'export'))
  want = zero_shot.run_benchmarks(exported, NAMES, str(shared / 'benchmarks'), LIMIT)
  for name in NAMES.split(','):
    assert bench[-1][f'{name}/acc'] == want[name]['acc']
    assert np.isfinite(bench[-1][f'{name}/acc_stderr'])
