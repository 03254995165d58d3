"""Variants as tables: a new FFN variant is one row of layers.FFN_VARIANTS, and everything that
depends on the FFN (the layer, validation, LoRA targets, FLOPs, the Hugging Face mapping)
follows from the row."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stlm import config as config_lib
from stlm.config import validate as config_validate
from stlm.export import hf
from stlm.models import factory
from stlm.models import layers
from stlm.models import weight_sharing
from stlm.models.byte_pool import v2_kind
from tests.param_fill import random_params


@pytest.fixture
def geglu(monkeypatch):
  """GeGLU (Shazeer 2020): gated like SwiGLU, GeLU instead of SiLU; no HF equivalent here."""
  table = dict(layers.FFN_VARIANTS, geglu=layers.FfnVariant(nn.gelu, gated=True))
  monkeypatch.setattr(layers, 'FFN_VARIANTS', table)
  monkeypatch.setitem(config_validate._CHOICES, 'model.ffn_type', table)  # pylint: disable=protected-access
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.ffn_type = 'geglu'
  return c


def test_a_new_ffn_row_is_validated_built_and_computed(geglu):
  config_validate.validate(geglu)
  m = geglu.model
  ffn = layers.FeedForward(m)
  x = jax.random.normal(jax.random.key(0), (2, 4, m.hidden_dim))
  params = ffn.init(jax.random.key(1), x)['params']
  assert set(params) == {'gate_kernel', 'up_kernel', 'down_kernel'}
  p = nn.unbox(params)
  h = nn.gelu(x @ p['gate_kernel']) * (x @ p['up_kernel'])
  np.testing.assert_allclose(ffn.apply({'params': params}, x), h @ p['down_kernel'],
                             rtol=1e-5, atol=1e-6)
  model = factory.build_model(m)
  batch = factory.dummy_batch(m, 2, 8)
  out = model.apply({'params': random_params(model, batch)}, batch)
  assert jnp.all(jnp.isfinite(out['logprobs']))


def test_a_new_ffn_row_reaches_lora_targets_flops_and_the_hf_mapping(geglu):
  m = geglu.model
  assert set(weight_sharing.kernel_shapes(m, 'ffn')) == {'gate', 'up', 'down'}
  m.kind, m.byte_pool.version = 'byte_pool', 'v2'
  breakdown = {'core': 1000}
  gated = v2_kind.flops_per_target(m, breakdown)
  m.ffn_type = 'gelu'
  b = m.byte_pool
  extra = 6 * (b.encoder_layers * b.encoder_ffn_dim + b.decoder_layers * b.decoder_ffn_dim) \
      * b.byte_dim * v2_kind.layout.stream_len(m.max_len, b.max_bytes_per_chunk) / m.max_len
  assert gated - v2_kind.flops_per_target(m, breakdown) == pytest.approx(extra)
  m.kind, m.ffn_type = 'baseline', 'geglu'
  with pytest.raises(hf.ExportError, match=r'model\.ffn_type=.geglu.'):
    hf.hf_architecture(geglu)


def test_an_unknown_variant_names_its_key():
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.position = 'alibi'
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.position='alibi': unknown "
                     r'value; choose one of rope, sincos, learned, none'):
    config_validate.validate(c)
  with pytest.raises(ValueError, match=r"model\.position 'alibi' unknown"):
    layers.position_variant(c.model)
