"""Config presets, overrides and start-up validation."""

import importlib
import subprocess
import sys

import pytest

from stlm import config as config_lib
from stlm.config import validate as config_validate
from tests.conftest import REPO_ROOT

CONFIG_FILES = sorted(p.stem for p in (REPO_ROOT / 'configs').glob('*.py') if p.stem != '__init__')


def load(name, preset='tiny'):
  return importlib.import_module(f'configs.{name}').get_config(preset)


@pytest.mark.parametrize('name', CONFIG_FILES)
@pytest.mark.parametrize('preset', config_lib.SIZE_PRESETS)
def test_every_config_and_preset_validates(name, preset):
  c = load(name, preset)
  config_validate.validate(c)
  assert c.preset == preset


def test_table1_baseline_at_50m():
  c = load('baseline', '50m')
  m, t = c.model, c.train
  assert (m.num_layers, m.hidden_dim, m.num_heads, m.num_heads // m.num_kv_heads) == (8, 512, 16, 4)
  assert (m.ffn_type, m.ffn_dim, m.position, m.max_len, m.dropout) == ('swiglu', 1536, 'rope', 512, 0.1)
  assert c.tokenizer.kind == 'gpt2' and m.vocab_size == 50257
  assert (t.lr, t.weight_decay, t.batch_size, t.grad_accum, t.steps, t.warmup_steps) == (
      6e-4, 0.1, 24, 20, 25000, 5000)
  assert t.schedule == 'cosine'


def test_table2_rows_differ_from_baseline_in_one_thing():
  base = load('baseline', '50m').model
  assert load('sincos_pe', '50m').model.position == 'sincos'
  assert load('learned_pe', '50m').model.position == 'learned'
  ffn = load('simple_ffn', '50m').model
  assert (ffn.ffn_type, ffn.ffn_dim) == ('gelu', 2304)
  assert load('dropout_free', '50m').model.dropout == 0.0
  assert base.position == 'rope' and base.dropout == 0.1


def test_unknown_preset_names_the_choices():
  with pytest.raises(ValueError, match='tiny, 10m, 50m, 100m'):
    load('baseline', '7b')


def _invalid(**overrides):
  c = load('baseline', '50m')
  for key, value in overrides.items():
    node = c
    parts = key.split('__')
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


@pytest.mark.parametrize('overrides,message', [
    (dict(model__num_heads=12), r'config\.model\.num_heads=12: does not divide model\.hidden_dim=512'),
    (dict(model__num_kv_heads=3), r'config\.model\.num_kv_heads=3: does not divide model\.num_heads=16'),
    (dict(model__ffn_type='relu'), r"config\.model\.ffn_type='relu': unknown value; choose one of swiglu, gelu"),
    (dict(model__position='alibi'), r"config\.model\.position='alibi': unknown value"),
    (dict(model__norm='batch'), r"config\.model\.norm='batch'"),
    (dict(model__position='learned', model__position_table_len=256),
     r'config\.model\.max_len=512: is longer than the learned position table'),
    (dict(model__dropout=1.5), r'config\.model\.dropout=1\.5: must be in \[0, 1\)'),
    (dict(model__hidden_dim=0), r'config\.model\.hidden_dim=0: must be a positive integer'),
    (dict(model__attention_impl='flash'), r"config\.model\.attention_impl='flash'"),
    (dict(tokenizer__kind='wordpiece'), r"config\.tokenizer\.kind='wordpiece'"),
    (dict(train__schedule='step'), r"config\.train\.schedule='step'"),
    (dict(train__warmup_steps=30000), r'config\.train\.warmup_steps=30000: must be in \[0, train\.steps=25000\]'),
    (dict(train__lr=-1.0), r'config\.train\.lr=-1\.0: must be positive'),
    (dict(data__source='local'), r"config\.data\.path='': data\.source='local' needs a directory"),
    (dict(data__val_fraction=0.0), r'config\.data\.val_fraction=0\.0'),
    (dict(mesh__shape=(-1, -1, 1)), r'config\.mesh\.shape=\(-1, -1, 1\): entries must be positive'),
    (dict(mesh__shape=(2, 2)), r'config\.mesh\.shape=\(2, 2\): needs one entry per axis'),
])
def test_invalid_configs_name_the_key(overrides, message):
  with pytest.raises(config_validate.ConfigError, match=message):
    config_validate.validate(_invalid(**overrides))


def test_rope_needs_even_head_dim():
  c = _invalid(model__hidden_dim=48, model__num_heads=16, model__num_kv_heads=4)
  with pytest.raises(config_validate.ConfigError, match=r'needs an even head dimension, got 48/16=3'):
    config_validate.validate(c)


def test_byte_pool_heads_must_divide_byte_dim():
  c = load('byte_pool', 'tiny')
  c.model.byte_pool.encoder_heads = 5
  with pytest.raises(config_validate.ConfigError, match=r'model\.byte_pool\.encoder_heads=5'):
    config_validate.validate(c)


def test_command_line_override_reaches_the_config():
  script = (
      'from absl import app, flags\n'
      'from ml_collections import config_flags\n'
      'config_flags.DEFINE_config_file("config")\n'
      'def main(_):\n'
      '  c = flags.FLAGS.config\n'
      '  print(c.train.lr, c.model.position, c.model.hidden_dim)\n'
      'app.run(main)\n')
  out = subprocess.run(
      [sys.executable, '-c', script, f'--config={REPO_ROOT / "configs/baseline.py"}:50m',
       '--config.train.lr=3e-4', '--config.model.position=sincos'],
      cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.split() == ['0.0003', 'sincos', '512']
