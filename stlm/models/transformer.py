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

from stlm.models import depth
from stlm.models import dropout as dropout_lib
from stlm.models import layers
from stlm.models import weight_sharing as sharing


class Block(nn.Module):
  """x + attn(norm(x)), then x + ffn(norm(x)), with residual dropout.

  shared_attn / shared_ffn: modules shared by every layer (stlm/models/weight_sharing.py) used
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


class _PositionalBlock(Block):
  """Block with positional arguments, so nn.remat can mark the Python flags static.

  A subclass, not a wrapper module: parameter names (block_i/attn/...) stay those of Block,
  so checkpoints load whatever model.remat is.
  """

  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, deterministic):
    return super().__call__(x_BxTxD, segment_ids_BxT, positions_BxT,
                            deterministic=deterministic)


# model.remat -> jax.checkpoint policy (None = save nothing: the block is recomputed whole).
REMAT_POLICIES = {
    'block': None,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
}


REMAT_MODES = ('none',) + tuple(REMAT_POLICIES)


def block_class(remat: str, decode: bool):
  """Block, or a rematerialised Block for model.remat ('none' | 'block' | 'dots_saveable')."""
  if remat == 'none' or decode:   # decoding never differentiates
    return None
  if remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat {remat!r} unknown; choose one of {REMAT_MODES}')
  # static_argnums count self as 0: `deterministic` (4) is a Python bool.
  return nn.remat(_PositionalBlock, policy=REMAT_POLICIES[remat], static_argnums=(4,))


class _ScanBlock(nn.Module):
  """One layer as an nn.scan body: carry x, layer-invariant inputs broadcast."""
  cfg: Any
  causal: bool = True

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, deterministic, mask, index,
               write):
    cls = block_class(self.cfg.remat, mask is not None)
    if cls is not None:
      x_BxTxD = cls(self.cfg, causal=self.causal, name='block')(
          x_BxTxD, segment_ids_BxT, positions_BxT, deterministic)
    else:
      x_BxTxD = Block(self.cfg, causal=self.causal, name='block')(
          x_BxTxD, segment_ids_BxT, positions_BxT, deterministic=deterministic,
          decode_mask_Bx1xTxL=mask, cache_index=index, write_cache=write)
    return nn.with_logical_constraint(x_BxTxD, layers.ACT_BxTxD), None


SCANNED_NAME = 'blocks'   # params['transformer'][SCANNED_NAME]['block'][...] with a layer axis


class Transformer(nn.Module):
  """A stack of `cfg.num_layers` pre-norm blocks named block_0, block_1, ..."""
  cfg: Any
  causal: bool = True

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, *, deterministic: bool,
               decode: bool = False, return_aux: bool = False):
    """y_BxTxD; with return_aux, (y_BxTxD, aux) where aux holds the depth options' extras.

    aux: exits {layer: final-normed hidden state} (LayerSkip early exits), token_stats and
    token_extra {name: f32 BxT} (mixture of depths: processed flags, predictor loss); see
    stlm/models/depth.py. All empty when those options are off.
    """
    cfg = self.cfg
    position = layers.position_variant(cfg)
    if x_BxTxD.shape[-1] != cfg.hidden_dim:
      raise ValueError(f'Transformer input width {x_BxTxD.shape[-1]} != model.hidden_dim '
                       f'{cfg.hidden_dim}')
    B, T = x_BxTxD.shape[:2]
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    x = x_BxTxD.astype(layers.dtype_of(cfg.dtype))
    if position.absolute:
      x = x + layers.AbsolutePosition(cfg, name='position')(positions_BxT)
    x = dropout_lib.Dropout(cfg.dropout)(x, deterministic=deterministic)
    # The residual stream: rows split over the batch axes, embed whole (see stlm.train.sharding).
    x = nn.with_logical_constraint(x, layers.ACT_BxTxD)

    mask, index, write = None, None, True
    if decode:
      mask, index, write = self._decode_state(segment_ids_BxT, B, T)

    # A plain loop (not nn.scan): stable, readable names per layer, per-layer partition
    # specs without a stacked 'layers' axis, and compile time is small at <= 12 layers.
    if cfg.scan_layers:
      # One compiled block for all layers (compile time at depth); params gain a leading
      # layer axis, convertible to/from block_i by stlm.models.scan_convert. Per-layer depth
      # options (layer drop, early exits, routing) are refused with scan_layers by validation.
      scanned = nn.scan(_ScanBlock, variable_axes={'params': 0, 'cache': 0},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=(nn.broadcast,) * 6, length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = scanned(cfg, causal=self.causal, name=SCANNED_NAME)(
          x, segment_ids_BxT, positions_BxT, deterministic, mask, index, write)
      y = layers.Norm(cfg, name='final_norm')(x)
      return (y, depth.new_aux()) if return_aux else y
    remat_cls = block_class(cfg.remat, decode)
    parts = sharing.shared_parts(cfg)
    shared = dict(
        shared_attn=layers.Attention(cfg, causal=self.causal, name=sharing.SHARED_NAMES['attn'])
        if 'attn' in parts else None,
        shared_ffn=layers.FeedForward(cfg, name=sharing.SHARED_NAMES['ffn'])
        if 'ffn' in parts else None)
    aux = depth.new_aux()
    exit_layers = dict(depth.early_exits(cfg))
    drop_rates = depth.layer_drop_rates(cfg)
    final_norm = layers.Norm(cfg, name='final_norm')
    for i in range(cfg.num_layers):
      kw = dict(deterministic=deterministic, decode_mask_Bx1xTxL=mask, cache_index=index,
                write_cache=write)
      if depth.is_routed(cfg, i):
        block = Block(cfg, causal=self.causal, layer=i, name=f'block_{i}', **shared)
        x_new, sel_BxT, bce_BxT = depth.routed_block(
            block, depth.Router(cfg, name=f'router_{i}'), x, segment_ids_BxT, positions_BxT,
            **kw)
        aux['token_stats'][f'mod_frac_block{i}'] = sel_BxT
        aux['token_extra'][f'mod_predictor_block{i}'] = bce_BxT
      elif remat_cls is not None:
        x_new = remat_cls(cfg, causal=self.causal, layer=i, name=f'block_{i}', **shared)(
            x, segment_ids_BxT, positions_BxT, deterministic)
      else:
        x_new = Block(cfg, causal=self.causal, layer=i, name=f'block_{i}', **shared)(
            x, segment_ids_BxT, positions_BxT, **kw)
      x = depth.layer_drop(self, x, x_new, drop_rates[i], deterministic=deterministic)
      x = nn.with_logical_constraint(x, layers.ACT_BxTxD)
      if return_aux and i + 1 in exit_layers:
        aux['exits'][i + 1] = final_norm(x)  # LayerSkip shares the final norm and head
    y = final_norm(x)
    return (y, aux) if return_aux else y

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
