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

from stlm.models import layers
from stlm.models import model_config

NEG_INF = -1e30


def local_cfg(cfg, *, num_layers: int, num_heads: int, ffn_dim: int, window: int, vocab: int):
  """Config of a byte-level local transformer: the core's choices at width byte_dim."""
  b = cfg.byte_pool
  if b.byte_dim % num_heads or (b.byte_dim // num_heads) % 2:
    raise ValueError(f'model.byte_pool.byte_dim={b.byte_dim} must split into {num_heads} '
                     'heads of even size (RoPE)')
  return model_config.of(cfg).plain_stack(
      num_layers=num_layers, hidden_dim=b.byte_dim, num_heads=num_heads,
      num_kv_heads=num_heads, ffn_dim=ffn_dim, position='rope', max_len=window,
      attention_impl='xla', vocab_size=vocab)


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
               after_attention=None, before_block=None):
    """The byte-pool decoder's core condition enters through one of two hooks:
    after_attention: fn(x_BxLxE, 0) -> B x L x E, joins the residual stream after the first
    attention sub-block (so the first attention's queries and keys see the symbols alone);
    before_block: fn(x_BxLxE, i) -> B x L x E, joins it before block i's attention, in every
    block (so the core steers every layer's byte attention, as BLT's decoder)."""
    cfg = self.cfg
    x = x_BxLxE.astype(layers.dtype_of(cfg.dtype))
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    for i in range(cfg.num_layers):
      if before_block is not None:
        x = x + before_block(x, i).astype(x.dtype)
      h = layers.Norm(cfg, name=f'block_{i}_attn_norm')(x)
      h = LocalAttention(cfg, name=f'block_{i}_attn')(h, seg_BxL, group_BxL)
      x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
      if i == 0 and after_attention is not None:
        x = x + after_attention(x, 0).astype(x.dtype)
      h = layers.Norm(cfg, name=f'block_{i}_ffn_norm')(x)
      h = layers.FeedForward(cfg, name=f'block_{i}_ffn')(h)
      x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    return layers.Norm(cfg, name='final_norm')(x)


class CoreCrossAttention(nn.Module):
  """Symbols attend to the last `chunks` core outputs of their document (byte-pool v2's
  'cross_attention' condition; BLT's decoder cross-attention over patches).

  A symbol of target chunk c reads core outputs c-chunks+1 .. c (each summarises the text up
  to and including its input chunk, so nothing of chunk c+1 is visible); keys carry a learned
  age embedding (0 = the newest), so the newest output can be told apart. Keys and values are
  projected once per chunk (`memory`), then gathered per symbol (`attend`).
  cfg: the local model's config (local_cfg); core_dim: the core's width.
  """
  cfg: Any
  core_dim: int
  chunks: int
  queries: int = 1

  def setup(self):
    cfg = self.cfg
    H, E, D = cfg.num_heads, cfg.hidden_dim, self.core_dim
    d = E // H
    kernel = lambda name, shape, axes, init: layers.make_param(self, name, init, shape, axes,
                                                               cfg)
    self.norm = layers.Norm(cfg)
    self.q_kernel = kernel('q_kernel', (E, H, d), ('embed', 'heads', 'head_dim'),
                           layers.fan_in_init(0, (1, 2)))
    self.k_kernel = kernel('k_kernel', (D, H, d), (None, 'heads', 'head_dim'),
                           layers.fan_in_init(0, (1, 2)))
    self.v_kernel = kernel('v_kernel', (D, H, d), (None, 'heads', 'head_dim'),
                           layers.fan_in_init(0, (1, 2)))
    # A table indexed by age (a relative position): named so, decay and Muon treat it as one.
    self.age = kernel('age_embedding', (self.chunks, H, d), ('position', 'heads', 'head_dim'),
                      layers.EMBED_INIT)
    # Small output init: at the start the decoder is a byte LM, the core joins as it learns.
    o_init = layers.fan_in_init((0, 1), 2, 1.0 / (2 * cfg.num_layers))
    self.o_kernel = kernel('o_kernel', (H, d, E), ('heads', 'head_dim', 'embed'), o_init)
    # Queries 1.. (one per decoder block with condition_at 'every_layer') share the memory's
    # keys and values, each with its own norm, query and output projections.
    self.extra_norms = [layers.Norm(cfg) for _ in range(self.queries - 1)]
    self.extra_q = [kernel(f'q_kernel_{i}', (E, H, d), ('embed', 'heads', 'head_dim'),
                           layers.fan_in_init(0, (1, 2))) for i in range(1, self.queries)]
    self.extra_o = [kernel(f'o_kernel_{i}', (H, d, E), ('heads', 'head_dim', 'embed'), o_init)
                    for i in range(1, self.queries)]

  def project(self, y_xD):
    """Core outputs [..., D] -> (keys, values) [..., H, d]."""
    dtype = layers.dtype_of(self.cfg.dtype)
    y = y_xD.astype(dtype)
    return (jnp.einsum('...d,dhk->...hk', y, self.k_kernel.astype(dtype)),
            jnp.einsum('...d,dhk->...hk', y, self.v_kernel.astype(dtype)))

  def memory(self, y_BxTxD, seg_BxT):
    """Per chunk c: keys/values of core outputs c-chunks+1 .. c (oldest first) and whether
    each exists in c's document: (B x T x K x H x d, same, bool B x T x K)."""
    k_BxTxHxd, v_BxTxHxd = self.project(y_BxTxD)
    T = y_BxTxD.shape[1]
    shifted = lambda a, s, fill=0: jnp.pad(a, [(0, 0), (s, 0)] + [(0, 0)] * (a.ndim - 2),
                                           constant_values=fill)[:, :T]
    ks, vs, ok = [], [], []
    for j in range(self.chunks):
      s = self.chunks - 1 - j
      ks.append(shifted(k_BxTxHxd, s))
      vs.append(shifted(v_BxTxHxd, s))
      ok.append((shifted(seg_BxT, s, -1) == seg_BxT) & (seg_BxT > 0))
    return jnp.stack(ks, 2), jnp.stack(vs, 2), jnp.stack(ok, 2)

  def attend(self, x_BxSxE, k_BxSxKxHxd, v_BxSxKxHxd, valid_BxSxK, query: int = 0):
    """The attention output B x S x E of query set `query` (zero where a symbol has no core
    output)."""
    dtype = layers.dtype_of(self.cfg.dtype)
    d = self.cfg.hidden_dim // self.cfg.num_heads
    norm, q_kernel, o_kernel = ((self.norm, self.q_kernel, self.o_kernel) if query == 0 else
                                (self.extra_norms[query - 1], self.extra_q[query - 1],
                                 self.extra_o[query - 1]))
    q = jnp.einsum('bse,ehd->bshd', norm(x_BxSxE).astype(dtype), q_kernel.astype(dtype))
    k = k_BxSxKxHxd + self.age.astype(dtype)
    s = jnp.einsum('bshd,bskhd->bshk', q, k, preferred_element_type=jnp.float32)
    s = jnp.where(valid_BxSxK[:, :, None], s / jnp.sqrt(jnp.float32(d)), NEG_INF)
    p = jax.nn.softmax(s, axis=-1) * valid_BxSxK.any(-1)[:, :, None, None]
    out = jnp.einsum('bshk,bskhd->bshd', p.astype(dtype), v_BxSxKxHxd)
    return jnp.einsum('bshd,hde->bse', out, o_kernel.astype(dtype))
