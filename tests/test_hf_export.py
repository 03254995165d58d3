"""Hugging Face export: transformers loads it offline with stlm's logits; inexact variants refused."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from stlm import config as config_lib
from stlm import export as export_lib
from stlm.export import hf as hf_export
from stlm import tokenizers
from stlm.models import factory
from tests.conftest import REPO_ROOT
from tests.conftest import require_shared_data
from tests.param_fill import fill_like

GPT2 = tokenizers.build_tokenizer(config_lib.base_config().tokenizer)


def exported(seed=0, **model):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.update(hidden_dim=32, num_heads=4, num_kv_heads=2, ffn_dim=64, num_layers=2,
                 max_len=64, vocab_size=GPT2.vocab_size)
  c.model.update(model)
  model_ = factory.build_model(c.model)
  params = fill_like(nn.unbox(factory.abstract_params(model_, c.model)), seed)
  # Unit-scale embeddings: logits of a few nats, so a 1e-4 bound means something.
  params['embed']['embedding'] = params['embed']['embedding'] * 200.0
  return export_lib.Exported(model_, params, c, GPT2, factory.make_featurizer(c, GPT2))


def real_text_ids(n=60):
  text = (require_shared_data() / 'corpus' / 'tinystories_sample.txt').read_text()[:2000]
  return text, GPT2.encode(text)[:n]


def stlm_logits(ex, ids):
  T = len(ids)
  return np.asarray(ex.model.apply({'params': ex.params}, jnp.asarray([ids]),
                                   jnp.ones((1, T), jnp.int32), jnp.arange(T)[None],
                                   method='logits')[0])


@pytest.mark.slow
@pytest.mark.parametrize('arch,model', [
    ('llama', dict()),   # the baseline: RoPE + SwiGLU + RMSNorm + GQA, tied
    ('llama', dict(use_bias=True, tie_embeddings=False, num_kv_heads=4)),
    # sin-cos vectors written into GPT-2's position table; a learned table maps the same way.
    ('gpt2', dict(position='sincos', ffn_type='gelu', norm='layer', num_kv_heads=4,
                  use_bias=True, tie_embeddings=False)),
])
def test_transformers_logits_match(tmp_path, arch, model):
  ex = exported(**model)
  out = tmp_path / 'hf'
  assert hf_export.export_hf(ex, str(out)) == arch
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                         local_files_only=True).eval()
  tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
  text, ids = real_text_ids()
  assert tok(text)['input_ids'][:len(ids)] == ids  # the same GPT-2 tokens, offline
  with torch.no_grad():
    theirs = hf(torch.tensor([ids])).logits[0].numpy()
  ours = stlm_logits(ex, ids)
  assert np.abs(ours).max() > 1.0
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
  assert json.loads((out / 'config.json').read_text())['model_type'] == arch


@pytest.mark.parametrize('model,key', [
    (dict(ffn_type='gelu'), 'model.ffn_type'),                         # simple_ffn: RoPE + GeLU
    (dict(position='learned'), 'model.norm'),                          # learned_pe: RMSNorm
    (dict(position='none'), 'model.position'),
    (dict(position='learned', ffn_type='gelu', norm='layer'), 'model.num_kv_heads'),
    (dict(kind='byte_pool'), 'model.kind'),
])
def test_inexact_variants_are_refused(model, key):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.update(model)
  with pytest.raises(hf_export.ExportError, match=key.replace('.', r'\.')) as e:
    hf_export.hf_architecture(c)
  assert 'refus' in str(e.value) or 'safetensors' in str(e.value)


@pytest.mark.slow
def test_cli_refuses_and_writes_nothing(tmp_path):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.ffn_type = 'gelu'
  ckpt = tmp_path / 'export'
  ckpt.mkdir()
  (ckpt / 'config.json').write_text(c.to_json())
  (ckpt / 'params').mkdir()
  out = tmp_path / 'hf'
  proc = subprocess.run([sys.executable, '-m', 'stlm.export', f'--checkpoint={ckpt}',
                         '--format=hf', f'--out={out}'], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0 and 'model.ffn_type' in proc.stderr and not out.exists()


@pytest.mark.slow
def test_safetensors_round_trip_byte_pool(tmp_path):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.update(kind='byte_pool', hidden_dim=32, num_heads=4, num_kv_heads=2, ffn_dim=64,
                 num_layers=1, max_len=16)
  c.model.byte_pool.update(byte_dim=32, encoder_layers=1, decoder_layers=1, encoder_heads=2,
                           decoder_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
  model = factory.build_model(c.model)
  params = fill_like(nn.unbox(factory.abstract_params(model, c.model)), 3)
  ex = export_lib.Exported(model, params, c, GPT2, factory.make_featurizer(c, GPT2))
  hf_export.export_safetensors(ex, str(tmp_path / 'st'))
  back = hf_export.load_safetensors(str(tmp_path / 'st'))
  assert back.config.to_dict() == json.loads(c.to_json())
  example, _ = ex.featurizer.pair('Once upon a time', ' there was a cat.')
  batch = {k: jnp.asarray(v)[None] for k, v in example.items()}
  T = batch['inputs'].shape[1]
  batch.update(segment_ids=jnp.ones((1, T), jnp.int32), positions=jnp.arange(T)[None])
  apply = jax.jit(lambda p, b: ex.model.apply({'params': p}, b)['logprobs'])
  a, b = apply(params, batch), apply(back.params, batch)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.all(np.isfinite(np.asarray(a)))
