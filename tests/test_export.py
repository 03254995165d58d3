"""Exports are written whole, then renamed into place: a reader never sees half of one."""

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import baseline as baseline_config
from stlm import export
from stlm.models import factory


def _params(config, seed):
  model = factory.build_model(config.model)
  return nn.unbox(model.init(jax.random.PRNGKey(seed),
                             factory.dummy_batch(config.model))['params'])


@pytest.fixture(scope='module')
def config():
  c = baseline_config.get_config('tiny')
  c.model.update(num_layers=1, hidden_dim=32, num_heads=2, num_kv_heads=1, ffn_dim=64,
                 max_len=16)
  c.tokenizer.kind = 'bytes'
  c.model.vocab_size = 257
  return c


def _leaves(params):
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_a_new_export_replaces_the_old_leaving_no_staging(tmp_path, config):
  directory = tmp_path / 'export'
  (tmp_path / 'export.writing').mkdir()        # left by a killed export
  export.save_export(str(directory), _params(config, 0), config)
  export.save_export(str(directory), _params(config, 1), config)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['export']
  loaded = export.load_export(str(directory))
  for a, b in zip(_leaves(loaded.params), _leaves(_params(config, 1))):
    np.testing.assert_array_equal(a, b)


def test_a_failed_write_leaves_the_old_export_whole(tmp_path, config, monkeypatch):
  directory = tmp_path / 'export'
  export.save_export(str(directory), _params(config, 0), config)

  def fail(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(ocp.StandardCheckpointer, 'save', fail)
  with pytest.raises(OSError):
    export.save_export(str(directory), _params(config, 1), config)
  monkeypatch.undo()
  loaded = export.load_export(str(directory))
  for a, b in zip(_leaves(loaded.params), _leaves(_params(config, 0))):
    np.testing.assert_array_equal(a, b)
