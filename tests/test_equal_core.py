"""The comparison's rows and runs: one shared core, the byte-level row's context, the
local-only row, equal-parameter and equal-FLOPs configs, shared runs for unchanged rows."""

import json

from absl import flags
from absl.testing import flagsaver
import pytest

from stlm.config import validate as config_validate
from stlm.experiments import equal_core
from stlm.experiments import rows

CORE = rows.Core.parse('2x64', '4/2', 32)


@pytest.mark.parametrize('name', list(rows.ROWS))
def test_every_row_builds_a_valid_config_around_the_core(name):
  c = rows.shared_core_config(name, CORE, bytes_per_token=3.5)
  config_validate.validate(c)
  row = rows.ROWS[name]
  if row.local_only:   # the byte-pool decoder's size, its window as context
    b = c.model.byte_pool
    assert (c.model.num_layers, c.model.hidden_dim, c.model.max_len) == (
        b.decoder_layers, b.byte_dim, b.local_window)
  else:
    assert (c.model.num_layers, c.model.hidden_dim, c.model.ffn_dim) == (2, 64, 192)
    assert c.model.max_len == (112 if row.context_in_bytes else 32)   # round(32 x 3.5)
  assert c.model.dropout == 0.0
  assert c.tokenizer.kind == (row.tokenizer or 'gpt2')


def test_rows_pin_their_decoder_so_config_defaults_can_move():
  for name in ('v2_cross', 'core_chunk', 'core_chunk_slots'):
    b = rows.ROWS[name].byte_pool
    assert {'condition', 'condition_at', 'decoder_context', 'decoder_layers', 'pooling'} <= set(b)
  assert rows.ROWS['core_chunk'].byte_pool['decoder_context'] == 'chunk'


@pytest.fixture
def workdir(tmp_path):
  # The corpus's bytes per token, as a finished measurement (no data read).
  (tmp_path / 'bytes_per_token.json').write_text(json.dumps({'bytes_per_token': 4.0}))
  flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(workdir=str(tmp_path), core='2x64', heads='4/2', context=32,
                           batch=2, steps=10):
    yield tmp_path


def test_equal_params_deepens_the_core_to_the_baseline_total(workdir):
  base = equal_core._counts(equal_core.row_experiment_config('baseline'))['total']
  c = equal_core.row_experiment_config('v2_cross', comparison='params')
  assert c.model.hidden_dim == 128 and c.model.num_layers >= 2
  gap = abs(equal_core._counts(c)['total'] - base)
  for layers in (c.model.num_layers - 1, c.model.num_layers + 1):   # the closest depth
    other = equal_core.row_experiment_config('v2_cross', comparison='params')
    other.model.num_layers = layers
    assert abs(equal_core._counts(other)['total'] - base) >= gap or layers < 2


def test_equal_flops_sets_steps_from_the_baseline_budget(workdir):
  base = equal_core.row_experiment_config('baseline')
  c = equal_core.row_experiment_config('v2_cross', comparison='flops')
  budget = equal_core._flops_per_step(base) * base.train.steps
  assert c.train.steps == round(budget / equal_core._flops_per_step(c))
  assert c.train.steps > base.train.steps     # the byte-pool step is cheaper: no 50K head
  assert c.train.warmup_steps == c.train.steps // 10


def test_unchanged_rows_share_the_core_comparisons_run(workdir):
  core_dir = lambda name: str(workdir / 'core' / 'seed1' / name)
  assert equal_core.run_dir('baseline', 1, 'params') == core_dir('baseline')
  assert equal_core.run_dir('local_only', 1, 'flops') == core_dir('local_only')
  assert equal_core.run_dir('v2_cross', 1, 'params') == str(workdir / 'params' / 'seed1' /
                                                            'v2_cross')


def test_unknown_rows_and_comparisons_are_usage_errors(workdir):
  from absl import app  # pylint: disable=g-import-not-at-top
  with pytest.raises(app.UsageError, match='--rows'):
    equal_core.row_experiment_config('nope')
  with pytest.raises(app.UsageError, match='--compare'):
    equal_core.row_experiment_config('baseline', comparison='speed')


def test_a_row_takes_a_presets_byte_sizes():
  c = rows.shared_core_config('v2_cross', CORE, bytes_per_token=3.5)
  assert c.model.byte_pool.decoder_layers == 1                 # the row's (tiny) sizes
  rows.use_byte_sizes(c, '10m')
  b = c.model.byte_pool
  assert (b.encoder_layers, b.decoder_layers, b.byte_dim) == (2, 2, 64)
  assert b.condition == 'cross_attention'                      # the rest stays the row's
