"""Building blocks of the transformer family: norms, positions, attention, FFN.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so the
train code can shard by rules. Params are stored in `model.param_dtype`; the math
runs in `model.dtype`, with norm statistics, RoPE angles and softmax in float32.
`cfg` everywhere is the model config (stlm/models/model_config.py) or any object with its
fields.
"""

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels import attention as attention_lib



# Variants as tables: `model.ffn_type`, `model.position` and `model.norm` each name a row, and
# everything that depends on the choice (the layers below, LoRA targets, FLOPs, the Hugging
# Face mapping, validation) reads the row. A new variant is one row plus its tests.
# `hf_architecture` names the Hugging Face architecture that computes exactly this variant
# (stlm/export/hf.py), or None where none does.


@dataclasses.dataclass(frozen=True)
class FfnVariant:
  """A feed-forward variant: activation(x @ up) or, gated, activation(x @ gate) * (x @ up)."""
  activation: Callable[[jax.Array], jax.Array]
  gated: bool
  hf_architecture: str | None = None

  @property
  def in_kernels(self) -> tuple[str, ...]:
    """The E x F kernels; 'down' (F x E) follows them."""
    return ('gate', 'up') if self.gated else ('up',)

  @property
  def matrices(self) -> int:
    return len(self.in_kernels) + 1


@dataclasses.dataclass(frozen=True)
class PositionVariant:
  """How positions enter: rotary on q and k, an absolute vector added to the input, or none."""
  rotary: bool = False
  absolute: str | None = None    # 'learned' (a table of max_len rows) | 'sincos' (fixed)
  hf_architecture: str | None = None


@dataclasses.dataclass(frozen=True)
class NormVariant:
  """RMSNorm, or LayerNorm: centred first and, with model.use_bias, a bias."""
  centred: bool
  hf_architecture: str | None = None


FFN_VARIANTS = {
    'swiglu': FfnVariant(nn.silu, gated=True, hf_architecture='llama'),
    # flax's nn.gelu is the tanh form, GPT-2's 'gelu_new'.
    'gelu': FfnVariant(nn.gelu, gated=False, hf_architecture='gpt2'),
}
POSITION_VARIANTS = {
    'rope': PositionVariant(rotary=True, hf_architecture='llama'),
    'sincos': PositionVariant(absolute='sincos', hf_architecture='gpt2'),
    'learned': PositionVariant(absolute='learned', hf_architecture='gpt2'),
    'none': PositionVariant(),
}
NORM_VARIANTS = {
    'rms': NormVariant(centred=False, hf_architecture='llama'),
    'layer': NormVariant(centred=True, hf_architecture='gpt2'),
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}



def _row(table: dict, key: str, value):
  if value not in table:
    raise ValueError(f'model.{key} {value!r} unknown; choose one of {tuple(table)}')
  return table[value]


def ffn_variant(cfg) -> FfnVariant:
  return _row(FFN_VARIANTS, 'ffn_type', cfg.ffn_type)


def position_variant(cfg) -> PositionVariant:
  return _row(POSITION_VARIANTS, 'position', cfg.position)


def norm_variant(cfg) -> NormVariant:
  return _row(NORM_VARIANTS, 'norm', cfg.norm)


EMBED_INIT = nn.initializers.normal(stddev=0.02)

# Logical names of activation axes. stlm.train.sharding maps them to mesh axes (batch over
# data x fsdp, heads / mlp / vocab over tensor); without a mesh and rules (unit tests,
# generation) nn.with_logical_constraint is a no-op.
ACT_BxTxD = ('activation_batch', 'activation_length', 'activation_embed')
ACT_BxTxF = ('activation_batch', 'activation_length', 'activation_mlp')
ACT_BxTxV = ('activation_batch', 'activation_length', 'activation_vocab')


def dtype_of(name: str) -> Any:
  """Maps a config dtype string to a jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f'model dtype {name!r} unknown; choose one of {tuple(DTYPES)}')
  return DTYPES[name]


def fan_in_init(in_axis=0, out_axis=-1, scale=1.0):
  """Normal fan-in init for einsum kernels whose input spans `in_axis`.

  Plain 'normal' rather than 'truncated_normal': same scale, and far cheaper to compile
  on CPU (truncated sampling lowers to erf_inv for every kernel shape).
  """
  return nn.initializers.variance_scaling(scale, 'fan_in', 'normal',
                                          in_axis=in_axis, out_axis=out_axis)


def make_param(module: nn.Module, name: str, init, shape, axes, cfg):
  """Creates a param in `cfg.param_dtype` tagged with logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f'param {name}: axes {axes} do not match shape {shape}')
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape),
                      dtype_of(cfg.param_dtype))


def low_rank(x, a, b, *, n_in: int, dtype):
  """x @ A @ B for a kernel whose input spans x's last n_in axes (LoRA; never forms A @ B).

  A: in_shape x r, B: r x out_shape.
  """
  h = jnp.tensordot(x, a.astype(dtype), axes=n_in)
  return jnp.tensordot(h, b.astype(dtype), axes=1)


def head_dim_of(cfg) -> int:
  if cfg.hidden_dim % cfg.num_heads:
    raise ValueError(f'model.hidden_dim {cfg.hidden_dim} must be divisible by '
                     f'model.num_heads {cfg.num_heads}')
  if cfg.num_heads % cfg.num_kv_heads:
    raise ValueError(f'model.num_heads {cfg.num_heads} must be a multiple of '
                     f'model.num_kv_heads {cfg.num_kv_heads}')
  return cfg.hidden_dim // cfg.num_heads


class Norm(nn.Module):
  """The norm of `model.norm` (NORM_VARIANTS) over the last axis, statistics in float32."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    centred = norm_variant(cfg).centred
    dim = x_BxTxD.shape[-1]
    x = x_BxTxD.astype(jnp.float32)
    if centred:
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    y = y * make_param(self, 'scale', nn.initializers.ones, (dim,), ('norm',), cfg)
    if centred and cfg.use_bias:
      y = y + make_param(self, 'bias', nn.initializers.zeros, (dim,), ('norm',), cfg)
    return y.astype(dtype_of(cfg.dtype))


def apply_rope(x_BxTxHxD, positions_BxT, theta: float):
  """Rotary embedding (rotate-half layout); q.k then depends on position differences only."""
  D = x_BxTxHxD.shape[-1]
  if D % 2:
    raise ValueError(f'rope needs an even head_dim, got {D}')
  half = D // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / D)
  angle_BxTx1xF = positions_BxT.astype(jnp.float32)[:, :, None, None] * inv_freq
  sin, cos = jnp.sin(angle_BxTx1xF), jnp.cos(angle_BxTx1xF)
  x = x_BxTxHxD.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


def sincos_embedding(positions_BxT, dim: int, max_timescale: float = 10000.0):
  """Fixed sinusoidal position vectors B x T x dim (float32), from arbitrary positions."""
  half = dim // 2
  inv_freq = jnp.exp(-jnp.log(max_timescale) * jnp.arange(half, dtype=jnp.float32)
                     / max(half, 1))
  angle_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([jnp.sin(angle_BxTxF), jnp.cos(angle_BxTxF)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb


class AbsolutePosition(nn.Module):
  """Input position vectors for 'learned' (table of max_len rows) or 'sincos'."""
  cfg: Any

  @nn.compact
  def __call__(self, positions_BxT):
    cfg = self.cfg
    kind = position_variant(cfg).absolute
    if kind == 'learned':
      table = make_param(self, 'embedding', EMBED_INIT, (cfg.max_len, cfg.hidden_dim),
                         ('position', 'embed'), cfg)
      # Positions past max_len would be clamped silently by take; the featurizer never emits them.
      return jnp.take(table, positions_BxT, axis=0).astype(dtype_of(cfg.dtype))
    if kind == 'sincos':
      return sincos_embedding(positions_BxT, cfg.hidden_dim).astype(dtype_of(cfg.dtype))
    raise ValueError(f'AbsolutePosition used with model.position {cfg.position!r}')


class TokenEmbedding(nn.Module):
  """Embedding table ('vocab', 'embed'); `attend` gives float32 logits for a tied head."""
  cfg: Any

  def setup(self):
    self.embedding = make_param(self, 'embedding', EMBED_INIT,
                                (self.cfg.vocab_size, self.cfg.hidden_dim), ('vocab', 'embed'),
                                self.cfg)

  def __call__(self, ids_BxT):
    x_BxTxD = jnp.take(self.embedding, ids_BxT, axis=0).astype(dtype_of(self.cfg.dtype))
    # The gather would otherwise inherit the table's fsdp split of embed; rows follow the batch.
    return nn.with_logical_constraint(x_BxTxD, ACT_BxTxD)

  def attend(self, x_BxTxD):
    dtype = dtype_of(self.cfg.dtype)
    logits_BxTxV = jnp.einsum('btd,vd->btv', x_BxTxD.astype(dtype), self.embedding.astype(dtype),
                              preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits_BxTxV, ACT_BxTxV)


def _resolved_impl(impl: str) -> str:
  if impl == 'auto':
    return 'pallas' if jax.default_backend() in ('gpu', 'tpu') else 'xla'
  return impl


def _mesh_axes_size(mesh, axes) -> int:
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in names)


def attention_per_shard(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxT, *, causal: bool,
                        impl: str):
  """kernels.attention run on each device's block of batch and heads (jax.shard_map).

  A Pallas kernel is a custom call XLA cannot partition: under a sharded jit it would get
  the whole (gathered) batch on every device. Batch follows 'activation_batch', heads
  'activation_heads'; GQA groups stay whole (a shard holds K/t kv heads and their H/t query
  heads). An axis that does not divide its dimension is left unsplit.
  """
  mesh = jax.sharding.get_abstract_mesh()
  batch, heads = nn.logical_to_mesh_axes(('activation_batch', 'activation_heads'))
  if q_BxTxHxD.shape[0] % _mesh_axes_size(mesh, batch):
    batch = None
  if q_BxTxHxD.shape[2] % _mesh_axes_size(mesh, heads) or \
      k_BxSxKxD.shape[2] % _mesh_axes_size(mesh, heads):
    heads = None
  qkv, seg = P(batch, None, heads, None), P(batch, None)

  def per_shard(q, k, v, s):
    return attention_lib.attention(q, k, v, q_segment_ids=s, kv_segment_ids=s, causal=causal,
                                   impl=impl)

  return jax.shard_map(per_shard, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                       check_vma=False)(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxT)


def _shard_map_needed(impl: str) -> bool:
  """A Pallas kernel under a multi-device mesh with logical rules (the sharded train step)."""
  mesh = jax.sharding.get_abstract_mesh()
  return (_resolved_impl(impl) == 'pallas' and not mesh.empty and mesh.size > 1
          and bool(nn.get_logical_axis_rules()))


class Attention(nn.Module):
  """Grouped-query self-attention. K/V keep num_kv_heads heads (never repeated).

  Training/full forward calls `kernels.attention.attention`. For decoding, the caller
  (Transformer) passes `decode_mask_Bx1xTxL` and `cache_index`: this layer then writes
  its new K/V into the 'cache' collection at cache_index and attends over the whole
  cache with the XLA reference and that mask.

  Shared by several layers (stlm/models/weight_sharing.py), each layer passes its own
  `cache_slot` (its K/V cache) and optionally `lora`: kernel name -> (A, B) low-rank terms
  added to the shared q/k/v/o kernels.
  """
  cfg: Any
  causal: bool = True

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, *, decode_mask_Bx1xTxL=None,
               cache_index=None, write_cache=True, cache_slot=None, lora=None):
    cfg = self.cfg
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.hidden_dim
    D = head_dim_of(cfg)
    dtype = dtype_of(cfg.dtype)
    x = x_BxTxD.astype(dtype)
    B, T = x.shape[:2]

    def project(name, heads, axis_name):
      w = make_param(self, f'{name}_kernel', fan_in_init(0, (1, 2)), (E, heads, D),
                     ('embed', axis_name, 'head_dim'), cfg)
      y = jnp.einsum('bte,ehd->bthd', x, w.astype(dtype))
      if lora and name in lora:
        y = y + low_rank(x, *lora[name], n_in=1, dtype=dtype)
      if cfg.use_bias:
        y = y + make_param(self, f'{name}_bias', nn.initializers.zeros, (heads, D),
                           (axis_name, 'head_dim'), cfg).astype(dtype)
      return y

    q_BxTxHxD = project('q', H, 'heads')
    k_BxTxKxD = project('k', K, 'kv_heads')
    v_BxTxKxD = project('v', K, 'kv_heads')
    if position_variant(cfg).rotary:
      q_BxTxHxD = apply_rope(q_BxTxHxD, positions_BxT, cfg.rope_theta)
      k_BxTxKxD = apply_rope(k_BxTxKxD, positions_BxT, cfg.rope_theta)

    if decode_mask_Bx1xTxL is None and segment_ids_BxT is not None and \
        _shard_map_needed(cfg.attention_impl):
      out_BxTxHxD = attention_per_shard(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT,
                                        causal=self.causal, impl=cfg.attention_impl)
    elif decode_mask_Bx1xTxL is None:
      out_BxTxHxD = attention_lib.attention(
          q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, q_segment_ids=segment_ids_BxT,
          kv_segment_ids=segment_ids_BxT, causal=self.causal, impl=cfg.attention_impl)
    else:
      L = decode_mask_Bx1xTxL.shape[-1]
      suffix = '' if cache_slot is None else f'_{cache_slot}'
      cached_k = self.variable('cache', 'key' + suffix, jnp.zeros, (B, L, K, D), dtype)
      cached_v = self.variable('cache', 'value' + suffix, jnp.zeros, (B, L, K, D), dtype)
      start = (0, cache_index, 0, 0)
      k_BxLxKxD = jax.lax.dynamic_update_slice(cached_k.value, k_BxTxKxD, start)
      v_BxLxKxD = jax.lax.dynamic_update_slice(cached_v.value, v_BxTxKxD, start)
      if write_cache:
        cached_k.value, cached_v.value = k_BxLxKxD, v_BxLxKxD
      out_BxTxHxD = attention_lib.xla_attention(q_BxTxHxD, k_BxLxKxD, v_BxLxKxD,
                                                decode_mask_Bx1xTxL)

    # Output projections start smaller (GPT-2): each layer adds two branches to the residual.
    w_o = make_param(self, 'o_kernel', fan_in_init((0, 1), 2, 1.0 / (2 * cfg.num_layers)),
                     (H, D, E), ('heads', 'head_dim', 'embed'), cfg)
    y = jnp.einsum('bthd,hde->bte', out_BxTxHxD.astype(dtype), w_o.astype(dtype))
    if lora and 'o' in lora:
      y = y + low_rank(out_BxTxHxD.astype(dtype), *lora['o'], n_in=2, dtype=dtype)
    if cfg.use_bias:
      y = y + make_param(self, 'o_bias', nn.initializers.zeros, (E,), ('embed',), cfg).astype(dtype)
    return y


class FeedForward(nn.Module):
  """The feed-forward of `model.ffn_type` (FFN_VARIANTS): (gate,) up, down.

  `lora`: kernel name -> (A, B) low-rank terms added to the kernels (a shared FFN's
  per-layer adapters, stlm/models/weight_sharing.py).
  """
  cfg: Any

  @nn.compact
  def __call__(self, x_BxTxD, lora=None):
    cfg = self.cfg
    variant = ffn_variant(cfg)
    dtype = dtype_of(cfg.dtype)
    E, F = cfg.hidden_dim, cfg.ffn_dim
    x = x_BxTxD.astype(dtype)

    def dense(name, inp, shape, axes, init):
      w = make_param(self, f'{name}_kernel', init, shape, axes, cfg)
      y = jnp.einsum('bti,io->bto', inp, w.astype(dtype))
      if lora and name in lora:
        y = y + low_rank(inp, *lora[name], n_in=1, dtype=dtype)
      if cfg.use_bias:
        y = y + make_param(self, f'{name}_bias', nn.initializers.zeros, shape[-1:], axes[-1:],
                           cfg).astype(dtype)
      return y

    up_BxTxF = dense('up', x, (E, F), ('embed', 'mlp'), fan_in_init())
    if variant.gated:
      gate_BxTxF = dense('gate', x, (E, F), ('embed', 'mlp'), fan_in_init())
      h_BxTxF = variant.activation(gate_BxTxF) * up_BxTxF
    else:
      h_BxTxF = variant.activation(up_BxTxF)
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ACT_BxTxF)
    # Like o_kernel: the last projection into the residual stream starts smaller.
    return dense('down', h_BxTxF, (F, E), ('mlp', 'embed'),
                 fan_in_init(scale=1.0 / (2 * cfg.num_layers)))
