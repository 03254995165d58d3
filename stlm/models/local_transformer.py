"""Causal transformer over a byte stream with sliding-window attention (byte-pool v2).

A symbol attends to itself and the `window - 1` symbols before it, inside its own segment
(packed documents never see each other; segment 0 is padding and sees nothing). With
`group_ids` it may further see only symbols of its own group (its chunk): the 'chunk'
context of the ablations. Attention is computed block-wise: the stream is cut into blocks of
`window` symbols and each block attends to itself and the block before, so the cost is
2 x window per symbol whatever the stream length, and nothing is computed for symbols beyond
the stream's end except the last block's padding.

Positions are RoPE over the row index: relative, so a symbol's output does not depend on where
its document starts in the row. The receptive field of L layers is L x (window - 1) symbols.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from stlm.models import layers

NEG_INF = -1e30


def local_cfg(cfg, *, num_layers: int, num_heads: int, ffn_dim: int, window: int, vocab: int):
  """Config of a byte-level local transformer: the core's choices at width byte_dim."""
  b = cfg.byte_pool
  if b.byte_dim % num_heads or (b.byte_dim // num_heads) % 2:
    raise ValueError(f'model.byte_pool.byte_dim={b.byte_dim} must split into {num_heads} '
                     'heads of even size (RoPE)')
  return ml_collections.FrozenConfigDict(dict(
      num_layers=num_layers, hidden_dim=b.byte_dim, num_heads=num_heads,
      num_kv_heads=num_heads, ffn_dim=ffn_dim, ffn_type=cfg.ffn_type, position='rope',
      rope_theta=cfg.rope_theta, max_len=window, norm=cfg.norm, norm_eps=cfg.norm_eps,
      dropout=cfg.dropout, use_bias=cfg.use_bias, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype, attention_impl='xla', vocab_size=vocab))


def _blocks(x, nb, W):
  """[B, nb*W, ...] -> (this block [B, nb, W, ...], previous+this [B, nb, 2W, ...])."""
  xb = x.reshape((x.shape[0], nb, W) + x.shape[2:])
  prev = jnp.concatenate([jnp.zeros_like(xb[:, :1]), xb[:, :-1]], axis=1)
  return xb, jnp.concatenate([prev, xb], axis=2)


def sliding_window_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, seg_BxL, group_BxL, window):
  """Causal attention of each symbol over the last `window` symbols (same segment/group)."""
  B, L, H, D = q_BxLxHxD.shape
  W = int(window)
  nb = -(-L // W)
  pad = nb * W - L
  if pad:
    padder = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD = map(padder, (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
    seg_BxL = padder(seg_BxL)
    if group_BxL is not None:
      group_BxL = padder(group_BxL)
  q, _ = _blocks(q_BxLxHxD, nb, W)          # B nb W H D
  _, k = _blocks(k_BxLxHxD, nb, W)          # B nb 2W H D
  _, v = _blocks(v_BxLxHxD, nb, W)
  sq, sk = _blocks(seg_BxL, nb, W)          # B nb W, B nb 2W
  rel = (jnp.arange(W)[:, None] + W) - jnp.arange(2 * W)[None, :]
  mask = ((rel >= 0) & (rel < W))[None, None]                      # 1 1 W 2W
  mask = mask & (sq[..., :, None] == sk[..., None, :]) & (sq != 0)[..., :, None]
  if group_BxL is not None:
    gq, gk = _blocks(group_BxL, nb, W)
    mask = mask & (gq[..., :, None] == gk[..., None, :])
  s = jnp.einsum('bnqhd,bnkhd->bnhqk', q, k, preferred_element_type=jnp.float32)
  s = s / jnp.sqrt(jnp.float32(D))
  s = jnp.where(mask[:, :, None], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  p = jnp.where(mask[:, :, None].any(-1, keepdims=True), p, 0.0)   # padding rows -> 0
  out = jnp.einsum('bnhqk,bnkhd->bnqhd', p.astype(v.dtype), v)
  return out.reshape(B, nb * W, H, D)[:, :L]


class LocalAttention(nn.Module):
  """Multi-head sliding-window self-attention (q/k/v/o as in layers.Attention)."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BxLxE, seg_BxL, group_BxL):
    cfg = self.cfg
    H, E = cfg.num_heads, cfg.hidden_dim
    D = E // H
    dtype = layers.dtype_of(cfg.dtype)
    x = x_BxLxE.astype(dtype)
    pos_BxL = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])

    def project(name):
      w = layers.make_param(self, f'{name}_kernel', layers.fan_in_init(0, (1, 2)), (E, H, D),
                            ('embed', 'heads', 'head_dim'), cfg)
      return jnp.einsum('ble,ehd->blhd', x, w.astype(dtype))

    q = layers.apply_rope(project('q'), pos_BxL, cfg.rope_theta)
    k = layers.apply_rope(project('k'), pos_BxL, cfg.rope_theta)
    out = sliding_window_attention(q, k, project('v'), seg_BxL, group_BxL, cfg.max_len)
    w_o = layers.make_param(self, 'o_kernel',
                            layers.fan_in_init((0, 1), 2, 1.0 / (2 * cfg.num_layers)),
                            (H, D, E), ('heads', 'head_dim', 'embed'), cfg)
    return jnp.einsum('blhd,hde->ble', out.astype(dtype), w_o.astype(dtype))


class LocalTransformer(nn.Module):
  """Pre-norm blocks of sliding-window attention + FFN, final norm (cfg from local_cfg)."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BxLxE, seg_BxL, group_BxL=None, *, deterministic: bool,
               after_attention_BxLxE=None):
    """after_attention: added to the residual stream after the first attention sub-block
    (so the first attention's queries and keys see the symbols alone)."""
    cfg = self.cfg
    x = x_BxLxE.astype(layers.dtype_of(cfg.dtype))
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    for i in range(cfg.num_layers):
      h = layers.Norm(cfg, name=f'block_{i}_attn_norm')(x)
      h = LocalAttention(cfg, name=f'block_{i}_attn')(h, seg_BxL, group_BxL)
      x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
      if i == 0 and after_attention_BxLxE is not None:
        x = x + after_attention_BxLxE.astype(x.dtype)
      h = layers.Norm(cfg, name=f'block_{i}_ffn_norm')(x)
      h = layers.FeedForward(cfg, name=f'block_{i}_ffn')(h)
      x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    return layers.Norm(cfg, name='final_norm')(x)
