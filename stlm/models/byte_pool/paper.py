"""The byte-pool LM (paper Section 5.2): byte encoder -> chunk pooling -> core -> byte decoder.

Each position of a row is one chunk (the bytes of a BPE token, see stlm/data/chunking.py
for the id scheme). The encoder embeds the chunk's bytes, runs a small bidirectional
transformer inside the chunk (pads masked) and pools to one vector per chunk; the core is
the baseline's causal `Transformer` over chunks; from each core output the decoder writes
the bytes of the NEXT chunk then END_OF_CHUNK (or EOT), one symbol per slot.

The decoder's logits are masked so every chunk distribution is normalised over exactly the
chunks the data can hold: no PAD ever; EOT only as the first symbol (it ends the chunk);
no END_OF_CHUNK first (chunks are non-empty); after max_bytes bytes only END_OF_CHUNK.
Hence sum(logprobs) is the exact log-probability of the text's chunk sequence, a proper
code length for the text on the same footing as the baseline's token sequence.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from stlm.config import errors as config_errors
from stlm.data.layout import chunk_width
# The byte ids live in stlm/ids.py (data and models share them); re-exported here.
from stlm.ids import BYTE_OFFSET, BYTE_VOCAB, END_OF_CHUNK, EOT, PAD  # pylint: disable=unused-import
from stlm.models import depth
from stlm.models import kinds
from stlm.models import layers
from stlm.models import pause
from stlm.models import transformer
from stlm.models.byte_pool import local_transformer
from stlm.models.byte_pool import slot_classes

# model.byte_pool.pooling, both versions: how a chunk's byte states become one core input.
POOLINGS = ('mean', 'attention', 'last', 'slots')
DECODERS = ('autoregressive', 'parallel')
NEG_INF = -1e30
# Chunk vectors enter the core, and core vectors enter the decoder, at the scale of the
# baseline's token embeddings (std 0.02; their inputs are RMS-normed, unit variance): at unit
# scale the core vector drowns the decoder's byte embeddings.
PROJ_INIT = layers.fan_in_init(scale=0.02 ** 2)


def byte_cfg(cfg, *, num_layers, num_heads, ffn_dim):
  """Config of a byte-level transformer: the core's choices at width byte_dim.

  Positions are always RoPE (a bag of bytes would lose their order and 'none' would give
  the bidirectional encoder no order at all) and attention is always XLA (a chunk is
  <= 17 slots; a flash kernel gains nothing there).
  """
  return local_transformer.local_cfg(
      cfg, num_layers=num_layers, num_heads=num_heads, ffn_dim=ffn_dim,
      window=cfg.byte_pool.max_bytes_per_chunk + 1, vocab=BYTE_VOCAB)


def slot_mask(num_slots: int, max_bytes: int):
  """Bool C x V: which symbols slot j of a target chunk may hold."""
  j_Cx1 = jnp.arange(num_slots)[:, None]
  v_1xV = jnp.arange(BYTE_VOCAB)[None, :]
  is_byte = v_1xV >= BYTE_OFFSET
  ok = is_byte & (j_Cx1 < max_bytes)
  ok |= (v_1xV == END_OF_CHUNK) & (j_Cx1 > 0)
  ok |= (v_1xV == EOT) & (j_Cx1 == 0)
  return ok


class AttentionPool(nn.Module):
  """Multi-head attention pooling with one learned query per head, over real bytes only."""
  cfg: Any  # byte-level cfg

  @nn.compact
  def __call__(self, h_NxCxE, real_NxC):
    cfg = self.cfg
    H, E = cfg.num_heads, cfg.hidden_dim
    D = E // H
    dtype = layers.dtype_of(cfg.dtype)
    q_HxD = layers.make_param(self, 'query', layers.EMBED_INIT, (H, D), ('heads', 'head_dim'),
                              cfg)
    w_k = layers.make_param(self, 'k_kernel', layers.fan_in_init(0, (1, 2)), (E, H, D),
                            ('embed', 'heads', 'head_dim'), cfg)
    k_NxCxHxD = jnp.einsum('nce,ehd->nchd', h_NxCxE.astype(dtype), w_k.astype(dtype))
    s_NxHxC = jnp.einsum('nchd,hd->nhc', k_NxCxHxD, q_HxD.astype(dtype),
                         preferred_element_type=jnp.float32) / jnp.sqrt(float(D))
    s_NxHxC = jnp.where(real_NxC[:, None, :], s_NxHxC, NEG_INF)
    p_NxHxC = jax.nn.softmax(s_NxHxC, axis=-1)
    p_NxHxC = jnp.where(real_NxC.any(-1)[:, None, None], p_NxHxC, 0.0)  # empty row -> 0
    v_NxCxHxD = h_NxCxE.reshape(h_NxCxE.shape[:2] + (H, D))
    out = jnp.einsum('nhc,nchd->nhd', p_NxHxC.astype(dtype), v_NxCxHxD.astype(dtype))
    return out.reshape(out.shape[0], E)


class ByteEncoder(nn.Module):
  """Chunk byte ids N x C -> one vector of the core's width per chunk (N x D)."""
  cfg: Any

  @nn.compact
  def __call__(self, ids_NxC, *, deterministic: bool):
    cfg, b = self.cfg, self.cfg.byte_pool
    if b.pooling not in POOLINGS:
      raise ValueError(f'model.byte_pool.pooling {b.pooling!r} unknown; choose one of '
                       f'{", ".join(POOLINGS)}')
    bcfg = byte_cfg(cfg, num_layers=b.encoder_layers, num_heads=b.encoder_heads,
                    ffn_dim=b.encoder_ffn_dim)
    N, C = ids_NxC.shape
    real_NxC = ids_NxC != PAD
    x_NxCxE = layers.TokenEmbedding(bcfg, name='embed')(ids_NxC)
    # Segment ids 1 = real byte, 0 = pad: real bytes never attend to pads (bidirectional).
    positions_NxC = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (N, C))
    h_NxCxE = transformer.Transformer(bcfg, causal=False, name='transformer')(
        x_NxCxE, real_NxC.astype(jnp.int32), positions_NxC, deterministic=deterministic)
    n_N = real_NxC.sum(-1)
    if b.pooling == 'mean':
      w_NxC = real_NxC / jnp.maximum(n_N, 1)[:, None]
      pooled_NxE = jnp.einsum('nc,nce->ne', w_NxC.astype(h_NxCxE.dtype), h_NxCxE)
    elif b.pooling == 'last':
      last_N = jnp.maximum(n_N - 1, 0)
      pooled_NxE = jnp.take_along_axis(h_NxCxE, last_N[:, None, None], axis=1)[:, 0]
      pooled_NxE = jnp.where((n_N > 0)[:, None], pooled_NxE, 0.0)
    elif b.pooling == 'slots':   # every slot's state, concatenated and projected (MEGABYTE)
      dtype = layers.dtype_of(cfg.dtype)
      w = layers.make_param(self, 'slots_to_core', layers.fan_in_init(1, 2, 0.02 ** 2),
                            (C, b.byte_dim, cfg.hidden_dim), (None, None, 'embed'), cfg)
      h = jnp.where(real_NxC[..., None], h_NxCxE, 0.0).astype(dtype)
      return jnp.einsum('nce,ced->nd', h, w.astype(dtype))
    else:
      pooled_NxE = AttentionPool(bcfg, name='pool')(h_NxCxE, real_NxC)
    dtype = layers.dtype_of(cfg.dtype)
    w = layers.make_param(self, 'to_core', PROJ_INIT, (b.byte_dim, cfg.hidden_dim),
                          (None, 'embed'), cfg)
    return jnp.einsum('ne,ed->nd', pooled_NxE.astype(dtype), w.astype(dtype))


class ByteDecoder(nn.Module):
  """Core outputs B x T x D (+ previous target symbols) -> masked f32 logits B x T x C x V.

  autoregressive: slot j sees END_OF_CHUNK (start), t_0 .. t_{j-1}, plus the core vector
  added to every slot; causal, so teacher forcing is exact and pads (always after the real
  slots) are never seen by a real slot. parallel: every slot sees only the core vector and a
  learned slot vector, so all slots are predicted at once with no access to the targets.
  """
  cfg: Any

  @nn.compact
  def __call__(self, y_BxTxD, targets_BxTxC, *, deterministic: bool):
    cfg, b = self.cfg, self.cfg.byte_pool
    if b.decoder not in DECODERS:
      raise ValueError(f'model.byte_pool.decoder {b.decoder!r} unknown; choose autoregressive '
                       'or parallel')
    bcfg = byte_cfg(cfg, num_layers=b.decoder_layers, num_heads=b.decoder_heads,
                    ffn_dim=b.decoder_ffn_dim)
    B, T, C = targets_BxTxC.shape
    if C > b.max_bytes_per_chunk + 1:
      raise ValueError(f'chunk rows of {C} slots exceed model.byte_pool.max_bytes_per_chunk + 1'
                       f' = {b.max_bytes_per_chunk + 1}')
    dtype = layers.dtype_of(cfg.dtype)
    w = layers.make_param(self, 'from_core', PROJ_INIT,
                          (cfg.hidden_dim, b.byte_dim), ('embed', None), cfg)
    cond_BxTxE = jnp.einsum('btd,de->bte', y_BxTxD.astype(dtype), w.astype(dtype))
    embed = layers.TokenEmbedding(bcfg, name='embed')
    if b.decoder == 'autoregressive':
      prev_BxTxC = jnp.concatenate(
          [jnp.full((B, T, 1), END_OF_CHUNK, jnp.int32), targets_BxTxC[..., :-1]], axis=-1)
      x_BxTxCxE = embed(prev_BxTxC) + cond_BxTxE[:, :, None, :]
    else:
      slots = layers.make_param(self, 'slot_embedding', layers.EMBED_INIT,
                                (b.max_bytes_per_chunk + 1, b.byte_dim), ('position', 'embed'),
                                bcfg)
      x_BxTxCxE = cond_BxTxE[:, :, None, :] + slots[:C].astype(dtype)
    x_NxCxE = x_BxTxCxE.reshape(B * T, C, b.byte_dim)
    seg_NxC = jnp.ones((B * T, C), jnp.int32)
    pos_NxC = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B * T, C))
    h_NxCxE = transformer.Transformer(bcfg, causal=b.decoder == 'autoregressive',
                                      name='transformer')(
        x_NxCxE, seg_NxC, pos_NxC, deterministic=deterministic)
    if cfg.tie_embeddings:
      logits_NxCxV = embed.attend(h_NxCxE)
    else:
      head = layers.make_param(self, 'head', layers.fan_in_init(), (b.byte_dim, BYTE_VOCAB),
                               ('embed', 'vocab'), bcfg)
      logits_NxCxV = jnp.einsum('nce,ev->ncv', h_NxCxE.astype(dtype), head.astype(dtype),
                                preferred_element_type=jnp.float32)
    logits_NxCxV = jnp.where(slot_mask(C, b.max_bytes_per_chunk)[None],
                             logits_NxCxV.astype(jnp.float32), NEG_INF)
    return logits_NxCxV.reshape(B, T, C, BYTE_VOCAB)


def slot_logprobs(logits_BxTxCxV, targets_BxTxC):
  """log p of each target symbol f32 B x T x C (0 on pad slots)."""
  lse = jax.nn.logsumexp(logits_BxTxCxV, axis=-1)
  tgt = jnp.take_along_axis(logits_BxTxCxV, targets_BxTxC[..., None], axis=-1)[..., 0]
  return jnp.where(targets_BxTxC != PAD, tgt - lse, 0.0)


def chunk_scores(logits_BxTxCxV, targets_BxTxC):
  """(log p of each target chunk f32 BxT, symbols predicted f32 BxT, all-greedy bool BxT)."""
  real_BxTxC = targets_BxTxC != PAD
  logprobs_BxT = slot_logprobs(logits_BxTxCxV, targets_BxTxC).sum(-1)
  units_BxT = real_BxTxC.sum(-1).astype(jnp.float32)
  hit = (jnp.argmax(logits_BxTxCxV, axis=-1) == targets_BxTxC) | ~real_BxTxC
  return logprobs_BxT, units_BxT, hit.all(-1)


class BytePoolLM(nn.Module):
  """Tokenizer-free LM over BPE-bounded byte chunks; `cfg` is the model ConfigDict section.

  Param tree: byte_encoder / core / byte_decoder (factory.param_breakdown counts the byte
  parts as the embedding and head of this model).

  core_transform: None (the model), or fn(y_BxTxD, segment_ids_BxT) -> y_BxTxD applied to
  the final core outputs before the decoder reads them in `scores` (diagnostics; early-exit
  outputs stay untouched); it adds no params, so `clone(core_transform=fn)` runs with the
  model's params.
  """
  cfg: Any
  core_transform: Callable[[jax.Array, jax.Array], jax.Array] | None = None

  def setup(self):
    self.byte_encoder = ByteEncoder(self.cfg)
    self.core = transformer.Transformer(self.cfg, causal=True)
    self.byte_decoder = ByteDecoder(self.cfg)
    self.pause_embedding = pause.make_param(self, self.cfg)

  def encode(self, inputs_BxTxC, *, deterministic=True):
    """Chunk byte ids B x T x C -> core inputs B x T x D (pause rows -> the pause vector)."""
    B, T, C = inputs_BxTxC.shape
    ids = inputs_BxTxC if self.pause_embedding is None else pause.strip(inputs_BxTxC)
    x_NxD = self.byte_encoder(ids.reshape(B * T, C), deterministic=deterministic)
    x_BxTxD = x_NxD.reshape(B, T, -1)
    if self.pause_embedding is None:
      return x_BxTxD
    return pause.substitute(x_BxTxD, pause.is_pause(inputs_BxTxC), self.pause_embedding)

  def _core(self, inputs_BxTxC, segment_ids_BxT, positions_BxT, *, deterministic, decode):
    x_BxTxD = self.encode(inputs_BxTxC, deterministic=deterministic)
    return self.core(x_BxTxD, segment_ids_BxT, positions_BxT, deterministic=deterministic,
                     decode=decode, return_aux=True)

  def core_step(self, inputs_BxTxC, segment_ids_BxT, positions_BxT, *, deterministic=True,
                decode=False):
    """Core outputs B x T x D for these chunks; decode=True appends them to the KV cache."""
    return self.core_step_and_layers(inputs_BxTxC, segment_ids_BxT, positions_BxT,
                                     deterministic=deterministic, decode=decode)[0]

  def core_step_and_layers(self, inputs_BxTxC, segment_ids_BxT, positions_BxT, *,
                           deterministic=True, decode=False):
    """(core outputs B x T x D, layers used f32 B x T): early exit applied at inference.

    An exit's confidence is the decoder's first-slot confidence (the distribution of the next
    chunk's first symbol), which needs no target bytes.
    """
    y_BxTxD, aux = self._core(inputs_BxTxC, segment_ids_BxT, positions_BxT,
                              deterministic=deterministic, decode=decode)
    layers_BxT = jnp.full(y_BxTxD.shape[:2], float(self.cfg.num_layers), jnp.float32)
    threshold = float(self.cfg.early_exit_threshold)
    if deterministic and threshold > 0.0:
      exited_BxT = jnp.zeros(layers_BxT.shape, bool)
      for layer, _ in depth.early_exits(self.cfg):
        h_BxTxD = aux['exits'][layer]
        go_BxT = ~exited_BxT & (self._first_slot_confidence(h_BxTxD) >= threshold)
        y_BxTxD = jnp.where(go_BxT[..., None], h_BxTxD, y_BxTxD)
        layers_BxT = jnp.where(go_BxT, float(layer), layers_BxT)
        exited_BxT |= go_BxT
    return y_BxTxD, layers_BxT

  def _first_slot_confidence(self, y_BxTxD):
    B, T = y_BxTxD.shape[:2]
    start = jnp.zeros((B, T, 1), jnp.int32)  # slot 0 reads only the start symbol
    return depth.exit_confidence(self.decode_logits(y_BxTxD, start)[:, :, 0])

  def decode_logits(self, y_BxTxD, targets_BxTxC, *, deterministic=True):
    """Masked f32 logits of each next-chunk slot (slot j uses targets before j only)."""
    return self.byte_decoder(y_BxTxD, targets_BxTxC, deterministic=deterministic)

  def scores(self, batch, *, deterministic=True):
    """(the __call__ dict, masked f32 logits B x T x C x V of every target slot)."""
    inputs, targets = batch['inputs'], batch['targets']
    if inputs.ndim != 3 or targets.shape != inputs.shape:
      raise ValueError(f'byte_pool batches need inputs/targets B x T x C, got '
                       f'{inputs.shape} and {targets.shape}')
    y_BxTxD, aux = self._core(inputs, batch['segment_ids'], batch['positions'],
                              deterministic=deterministic, decode=False)
    if self.core_transform is not None:
      y_BxTxD = self.core_transform(y_BxTxD, batch['segment_ids'])
    logits = self.decode_logits(y_BxTxD, targets, deterministic=deterministic)
    logprobs, units, greedy = chunk_scores(logits, targets)
    out = dict(logprobs=logprobs, units=units, greedy=greedy)

    def exit_scores(h_BxTxD):
      # The early exit writes the next chunk through the same byte decoder.
      exit_logits = self.decode_logits(h_BxTxD, targets, deterministic=deterministic)
      lp, _, gr = chunk_scores(exit_logits, targets)
      return lp, gr, depth.exit_confidence(exit_logits[:, :, 0])

    out = depth.add_exit_outputs(self.cfg, out, aux, exit_scores, batch['loss_mask'],
                                 deterministic=deterministic)
    return depth.add_token_aux(out, aux, batch['loss_mask']), logits

  def slot_class_scores(self, batch, *, deterministic=True):
    """Slot class (slot_classes.CLASSES) -> (summed log p of its symbols, symbols), each
    f32 B x T per target chunk; the classes' log p add up to __call__'s logprobs."""
    _, logits = self.scores(batch, deterministic=deterministic)
    targets = batch['targets']
    slot = jnp.broadcast_to(jnp.arange(targets.shape[-1]), targets.shape)
    masks = slot_classes.class_masks(targets, slot)
    return slot_classes.class_sums(slot_logprobs(logits, targets), masks,
                                   lambda v: v.sum(-1))

  def __call__(self, batch, *, deterministic=True):
    return self.scores(batch, deterministic=deterministic)[0]


def flops_per_target(model_cfg, breakdown) -> float:
  """6 x (core + the byte encoder and decoder, which run once per byte slot) + attention.

  Shared layers cost compute in every layer: the core counts as `core_applied`.
  """
  m = model_cfg
  per_chunk = chunk_width(m.byte_pool.max_bytes_per_chunk)
  core = breakdown.get('core_applied', breakdown['core'])
  return 6 * (core + per_chunk * (breakdown['embedding'] + breakdown['head'])) \
      + kinds.attention_flops_per_target(m)


def validate(model_cfg) -> None:
  """The paper version's keys: pooling and decoder choices."""
  b = model_cfg.byte_pool
  for key, choices in (('pooling', POOLINGS), ('decoder', DECODERS)):
    if b[key] not in choices:
      config_errors.fail(f'model.byte_pool.{key}', b[key],
                         f'unknown value; choose one of {", ".join(choices)}')


def unit_shape(model_cfg):
  """One slot more than the longest chunk: room for its end-of-chunk symbol."""
  return (chunk_width(model_cfg.byte_pool.max_bytes_per_chunk),)


def dummy_batch(model_cfg, batch_size=1, seq_len=None):
  return kinds.layout_batch(model_cfg, unit_shape(model_cfg), batch_size, seq_len)


def synthetic_batch(model_cfg, rng, leading_shape):
  return kinds.random_batch(model_cfg, unit_shape(model_cfg), rng, leading_shape, BYTE_OFFSET,
                            BYTE_VOCAB)
