"""Pre-norm transformer core shared by the baseline and the byte-pool model.

`Transformer(cfg, causal=True)` maps x_BxTxD (token embeddings, pooled chunk vectors,
anything of width cfg.hidden_dim) to y_BxTxD with the final norm applied. It owns the
position handling: 'learned'/'sincos' vectors are added to x at the input, 'rope' is
applied to q/k inside attention, 'none' adds nothing. `positions_BxT` restart at 0 per
packed document; `segment_ids_BxT` (0 = padding) keep documents apart.

Decoding (`decode=True`) keeps a KV cache of cfg.max_len slots in the 'cache'
collection. Usage:
  cache = model.init(rng, x_Bx1xD, seg, pos, deterministic=True, decode=True)['cache']
  y, mut = model.apply({'params': p, 'cache': cache}, x_new, seg_new, pos_new,
                       deterministic=True, decode=True, mutable=['cache'])
  cache = mut['cache']
Each call appends its T new positions (one or many) after those already cached; the
outputs equal the full forward pass over the concatenation. `init` leaves the cache
empty; an `apply` without a cache starts from an empty one.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stlm.models import dropout as dropout_lib
from stlm.models import layers
from stlm.models import sharing


class Block(nn.Module):
  """x + attn(norm(x)), then x + ffn(norm(x)), with residual dropout.

  shared_attn / shared_ffn: modules shared by every layer (stlm/models/sharing.py) used
  instead of this block's own; `layer` picks this block's KV cache in a shared attention.
  """
  cfg: Any
  causal: bool = True
  shared_attn: Any = None
  shared_ffn: Any = None
  layer: int = 0

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, *, deterministic: bool,
               decode_mask_Bx1xTxL=None, cache_index=None, write_cache=True):
    cfg = self.cfg
    attn_kw, ffn_kw = {}, {}
    if self.shared_attn is not None:
      attn, attn_kw['cache_slot'] = self.shared_attn, self.layer
      if sharing.lora_rank(cfg):
        attn_kw['lora'] = sharing.LoRA(cfg, 'attn', name='attn_lora')()
    else:
      attn = layers.Attention(cfg, causal=self.causal, name='attn')
    if self.shared_ffn is not None:
      ffn = self.shared_ffn
      if sharing.lora_rank(cfg):
        ffn_kw['lora'] = sharing.LoRA(cfg, 'ffn', name='ffn_lora')()
    else:
      ffn = layers.FeedForward(cfg, name='ffn')
    h = layers.Norm(cfg, name='attn_norm')(x_BxTxD)
    h = attn(h, segment_ids_BxT, positions_BxT, decode_mask_Bx1xTxL=decode_mask_Bx1xTxL,
             cache_index=cache_index, write_cache=write_cache, **attn_kw)
    x_BxTxD = x_BxTxD + dropout_lib.Dropout(cfg.dropout)(h, deterministic=deterministic)
    h = layers.Norm(cfg, name='ffn_norm')(x_BxTxD)
    h = ffn(h, **ffn_kw)
    return x_BxTxD + dropout_lib.Dropout(cfg.dropout)(h, deterministic=deterministic)


class Transformer(nn.Module):
  """A stack of `cfg.num_layers` pre-norm blocks named block_0, block_1, ..."""
  cfg: Any
  causal: bool = True

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, *, deterministic: bool,
               decode: bool = False):
    cfg = self.cfg
    if cfg.position not in layers.POSITIONS:
      raise ValueError(f'model.position {cfg.position!r} unknown; choose one of '
                       f'{layers.POSITIONS}')
    if x_BxTxD.shape[-1] != cfg.hidden_dim:
      raise ValueError(f'Transformer input width {x_BxTxD.shape[-1]} != model.hidden_dim '
                       f'{cfg.hidden_dim}')
    B, T = x_BxTxD.shape[:2]
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    x = x_BxTxD.astype(layers.dtype_of(cfg.dtype))
    if cfg.position in ('learned', 'sincos'):
      x = x + layers.AbsolutePosition(cfg, name='position')(positions_BxT)
    x = dropout_lib.Dropout(cfg.dropout)(x, deterministic=deterministic)
    # The residual stream: rows split over the batch axes, embed whole (see stlm.train.sharding).
    x = nn.with_logical_constraint(x, layers.ACT_BxTxD)

    mask, index, write = None, None, True
    if decode:
      mask, index, write = self._decode_state(segment_ids_BxT, B, T)

    # A plain loop (not nn.scan): stable, readable names per layer, per-layer partition
    # specs without a stacked 'layers' axis, and compile time is small at <= 12 layers.
    parts = sharing.shared_parts(cfg)
    shared = dict(
        shared_attn=layers.Attention(cfg, causal=self.causal, name=sharing.SHARED_NAMES['attn'])
        if 'attn' in parts else None,
        shared_ffn=layers.FeedForward(cfg, name=sharing.SHARED_NAMES['ffn'])
        if 'ffn' in parts else None)
    for i in range(cfg.num_layers):
      x = Block(cfg, causal=self.causal, layer=i, name=f'block_{i}', **shared)(
          x, segment_ids_BxT, positions_BxT, deterministic=deterministic,
          decode_mask_Bx1xTxL=mask, cache_index=index, write_cache=write)
      x = nn.with_logical_constraint(x, layers.ACT_BxTxD)
    return layers.Norm(cfg, name='final_norm')(x)

  def _decode_state(self, segment_ids_BxT, B, T):
    """Advances the shared cache index; returns (mask B x 1 x T x L, start index, write?)."""
    L = self.cfg.max_len
    if T > L:
      raise ValueError(f'decode step of {T} positions exceeds the cache (model.max_len {L})')
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    seg_cache = self.variable('cache', 'segment_ids', lambda: jnp.zeros((B, L), jnp.int32))
    # init only shapes the cache: it must come back empty, not holding the dummy input.
    write = not self.is_initializing()
    start = index.value
    seg_BxL = jax.lax.dynamic_update_slice(seg_cache.value,
                                           segment_ids_BxT.astype(jnp.int32), (0, start))
    q_slot_T = start + jnp.arange(T)
    k_slot_L = jnp.arange(L)
    # Unfilled slots are hidden; causality uses slot order, which is position order within
    # a document (positions restart per document, slots never do).
    mask = (segment_ids_BxT[:, None, :, None] == seg_BxL[:, None, None, :])
    mask &= (k_slot_L < start + T)[None, None, None, :]
    if self.causal:
      mask &= (k_slot_L[None, :] <= q_slot_T[:, None])[None, None]
    if write:
      index.value = start + T
      seg_cache.value = seg_BxL
    return mask, start, write
