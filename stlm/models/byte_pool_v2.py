"""The byte-pool LM, second generation: local byte-stream encoder and decoder around the core.

Batches are in the ragged stream layout of `stlm/data/byte_stream.py`: a row holds its chunks'
symbols back to back (bytes + END_OF_CHUNK, or EOT), so no compute goes to per-chunk padding.

- Encoder: byte embeddings (+ hashed byte n-gram embeddings, BLT) -> a causal sliding-window
  transformer over the input stream (a symbol sees the `local_window - 1` symbols before it,
  earlier chunks included, later ones never) -> one vector per chunk by segment reductions
  (mean, last or attention pooling) -> the core's width.
- Core: the baseline's causal `Transformer` over chunks.
- Decoder: over the target stream, each symbol's input is the previous symbol (+ its slot
  embedding); the projected core output of the chunk before its chunk joins the residual
  stream after the first attention sub-block (condition_at 'after_attention', the default;
  'input' adds it to the input). A causal sliding-window transformer, so a byte of chunk t+1
  sees y_t and the bytes before it, including the previous chunks' (decoder_context 'window';
  'chunk' limits it to its own chunk, like v1).

Why after the first attention: added at the input, the core vector (constant over a chunk,
different across chunks) dominates the first layer's queries and keys, and the window decoder
stalled at ~5.6 bits/byte for 100 steps (equal_core 4x128, batch 8), while the same model with
the core output replaced by zeros kept learning (3.75 bits/byte at 120 steps vs 5.47).
Entering after the first attention (3.63) lets that attention learn byte patterns first.
Slot embeddings (slot_embedding, a learned vector per slot of a chunk) give each symbol its
slot, which v1's per-chunk rows give by position (5.47 -> 5.10 with the input-added core).

The logits are masked per slot exactly as v1's (`slot j` = symbol index within its chunk): no
PAD, EOT only first, no END_OF_CHUNK first, only END_OF_CHUNK after max_bytes bytes. So the
per-chunk sums are exact log-probabilities of the chunk sequence and the outputs keep the
contract of every LM: logprobs / units / greedy per chunk target, B x T.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stlm import byte_ids
from stlm.byte_ids import BYTE_OFFSET, BYTE_VOCAB, END_OF_CHUNK, EOT, PAD  # pylint: disable=unused-import
from stlm.models import layers
from stlm.models import local_transformer as local

NEG_INF = -1e30
# As in v1: chunk vectors enter the core, and core vectors the decoder, at embedding scale.
PROJ_INIT = layers.fan_in_init(scale=0.02 ** 2)
CONTEXTS = ('window', 'chunk')
CONDITIONS = ('add', 'slot_add')
CONDITION_AT = ('input', 'after_attention')
_HASH_MUL = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C,
             0xFD7046C5, 0xB55A4F09)


def chunk_index(start_BxS, seg_BxS, T: int):
  """Flat chunk index b*T + t of every symbol (B*T, dropped by segment ops, for padding)."""
  B = start_BxS.shape[0]
  cidx = jnp.cumsum(start_BxS.astype(jnp.int32), axis=1) - 1
  valid = (seg_BxS > 0) & (cidx >= 0) & (cidx < T)
  return jnp.where(valid, jnp.arange(B, dtype=jnp.int32)[:, None] * T + cidx, B * T), valid


def slot_index(start_BxS):
  """Index of each symbol within its chunk (0 on chunk starts)."""
  pos = jnp.arange(start_BxS.shape[1], dtype=jnp.int32)[None]
  last_start = jax.lax.cummax(jnp.where(start_BxS > 0, pos, 0), axis=1)
  return pos - last_start


def slot_table(module, cfg, bcfg):
  """The learned slot-index embedding (max_bytes + 1 rows), or None when
  model.byte_pool.slot_embedding is off.

  Over the stream a symbol's slot in its chunk is otherwise only implied by attention to the
  chunk's first symbol; v1's per-chunk rows give it directly (positions within the row).
  """
  b = cfg.byte_pool
  if not b.get('slot_embedding', False):
    return None
  return layers.make_param(module, 'slot_embedding', layers.EMBED_INIT,
                           (b.max_bytes_per_chunk + 1, b.byte_dim), ('position', 'embed'), bcfg)


def add_slots(x_BxSxE, table, start_BxS, max_bytes: int):
  """x + each symbol's slot embedding (slots past max_bytes, padding only, read the last row)."""
  if table is None:
    return x_BxSxE
  slot = jnp.minimum(slot_index(start_BxS), max_bytes)
  return x_BxSxE + jnp.take(table, slot, axis=0).astype(x_BxSxE.dtype)


def allowed_symbols(slot_BxS, max_bytes: int):
  """Bool B x S x V: which symbols slot j of a chunk may hold (v1's slot_mask, per symbol)."""
  j = slot_BxS[..., None]
  v = jnp.arange(BYTE_VOCAB)
  ok = (v >= BYTE_OFFSET) & (j < max_bytes)
  ok |= (v == END_OF_CHUNK) & (j > 0)
  ok |= (v == EOT) & (j == 0)
  return ok


def ngram_hash(ids_BxS, seg_BxS, n: int, buckets: int, salt: int):
  """Hash of the n symbols ending at each position (same segment only) into [0, buckets)."""
  h = jnp.full(ids_BxS.shape, salt, jnp.uint32)
  for k in range(n):
    prev = jnp.pad(ids_BxS, ((0, 0), (k, 0)))[:, :ids_BxS.shape[1]]
    prev_seg = jnp.pad(seg_BxS, ((0, 0), (k, 0)), constant_values=-1)[:, :ids_BxS.shape[1]]
    x = jnp.where(prev_seg == seg_BxS, prev + 1, 0).astype(jnp.uint32)
    h = (h ^ x) * jnp.uint32(_HASH_MUL[k % len(_HASH_MUL)])
    h = h ^ (h >> 15)
  return (h % jnp.uint32(buckets)).astype(jnp.int32)


class StreamEncoder(nn.Module):
  """Input stream B x S -> one vector of the core's width per chunk position (B x T x D)."""
  cfg: Any

  @nn.compact
  def __call__(self, ids_BxS, start_BxS, seg_BxS, T: int, *, deterministic: bool):
    cfg, b = self.cfg, self.cfg.byte_pool
    ecfg = local.local_cfg(cfg, num_layers=b.encoder_layers, num_heads=b.encoder_heads,
                           ffn_dim=b.encoder_ffn_dim, window=b.local_window, vocab=BYTE_VOCAB)
    B, S = ids_BxS.shape
    E = b.byte_dim
    dtype = layers.dtype_of(cfg.dtype)
    x = layers.TokenEmbedding(ecfg, name='embed')(ids_BxS)
    for i, n in enumerate(b.ngram_sizes if b.ngram_buckets else ()):
      table = layers.make_param(self, f'ngram_{n}', layers.EMBED_INIT, (b.ngram_buckets, E),
                                ('vocab', 'embed'), ecfg)
      x = x + jnp.take(table, ngram_hash(ids_BxS, seg_BxS, n, b.ngram_buckets, 1 + i),
                       axis=0).astype(dtype)
    x = add_slots(x, slot_table(self, cfg, ecfg), start_BxS, b.max_bytes_per_chunk)
    group = jnp.cumsum(start_BxS, axis=1) if b.encoder_context == 'chunk' else None
    h = local.LocalTransformer(ecfg, name='transformer')(x, seg_BxS, group,
                                                         deterministic=deterministic)
    flat, valid = chunk_index(start_BxS, seg_BxS, T)
    flat_N, h_NxE = flat.reshape(-1), h.reshape(B * S, E).astype(jnp.float32)
    seg_sum = lambda v: jax.ops.segment_sum(v, flat_N, num_segments=B * T)
    if b.pooling == 'mean':
      n_chunk = seg_sum(valid.reshape(-1).astype(jnp.float32))
      pooled = seg_sum(h_NxE) / jnp.maximum(n_chunk, 1.0)[:, None]
    elif b.pooling == 'last':
      nxt_start = jnp.pad(start_BxS[:, 1:], ((0, 0), (0, 1)), constant_values=1)
      nxt_seg = jnp.pad(seg_BxS[:, 1:], ((0, 0), (0, 1)))
      last = valid & ((nxt_start > 0) | (nxt_seg != seg_BxS))
      pooled = seg_sum(h_NxE * last.reshape(-1, 1))
    elif b.pooling == 'attention':
      H = b.encoder_heads
      D = E // H
      q_HxD = layers.make_param(self, 'pool_query', layers.EMBED_INIT, (H, D),
                                ('heads', 'head_dim'), ecfg)
      w_k = layers.make_param(self, 'pool_k_kernel', layers.fan_in_init(0, (1, 2)), (E, H, D),
                              ('embed', 'heads', 'head_dim'), ecfg)
      s_NxH = jnp.einsum('ne,ehd,hd->nh', h_NxE, w_k, q_HxD) / jnp.sqrt(float(D))
      s_NxH = jnp.where(valid.reshape(-1, 1), s_NxH, NEG_INF)
      smax = jax.ops.segment_max(s_NxH, flat_N, num_segments=B * T)
      smax = jnp.concatenate([smax, jnp.zeros((1, H))])[flat_N]   # pads read a dummy row
      e_NxH = jnp.where(valid.reshape(-1, 1), jnp.exp(s_NxH - jax.lax.stop_gradient(smax)), 0.)
      denom = seg_sum(e_NxH)
      num = seg_sum((e_NxH[:, :, None] * h_NxE.reshape(-1, H, D)).reshape(-1, E))
      pooled = (num.reshape(-1, H, D) / jnp.maximum(denom, 1e-30)[:, :, None]).reshape(-1, E)
    else:
      raise ValueError(f'model.byte_pool.pooling {b.pooling!r} unknown; choose mean, '
                       'attention or last')
    w = layers.make_param(self, 'to_core', PROJ_INIT, (E, cfg.hidden_dim), (None, 'embed'), cfg)
    x_BxTxD = jnp.einsum('ne,ed->nd', pooled.astype(dtype), w.astype(dtype))
    return x_BxTxD.reshape(B, T, cfg.hidden_dim)


class StreamDecoder(nn.Module):
  """Previous symbols + per-symbol condition -> masked f32 logits B x S x V."""
  cfg: Any

  def setup(self):
    cfg, b = self.cfg, self.cfg.byte_pool
    self.dcfg = local.local_cfg(cfg, num_layers=b.decoder_layers, num_heads=b.decoder_heads,
                                ffn_dim=b.decoder_ffn_dim, window=b.local_window,
                                vocab=BYTE_VOCAB)
    if b.get('condition', 'add') == 'slot_add':
      # MEGABYTE: one projection of the core output per slot of the next chunk.
      self.from_core = layers.make_param(
          self, 'from_core', layers.fan_in_init(0, (1, 2), 0.02 ** 2),
          (cfg.hidden_dim, b.max_bytes_per_chunk + 1, b.byte_dim), ('embed', None, None), cfg)
    else:
      self.from_core = layers.make_param(self, 'from_core', PROJ_INIT,
                                         (cfg.hidden_dim, b.byte_dim), ('embed', None), cfg)
    self.embed = layers.TokenEmbedding(self.dcfg)
    self.slots = slot_table(self, cfg, self.dcfg)
    self.transformer = local.LocalTransformer(self.dcfg)
    if not cfg.tie_embeddings:
      self.head = layers.make_param(self, 'head', layers.fan_in_init(), (b.byte_dim, BYTE_VOCAB),
                                    ('embed', 'vocab'), self.dcfg)

  def condition(self, y_xD):
    """Core outputs [..., D] -> decoder conditions [..., byte_dim] ('add') or one per slot
    [..., max_bytes + 1, byte_dim] ('slot_add')."""
    dtype = layers.dtype_of(self.cfg.dtype)
    w = self.from_core.astype(dtype)
    if w.ndim == 3:
      return jnp.einsum('...d,dce->...ce', y_xD.astype(dtype), w)
    return jnp.einsum('...d,de->...e', y_xD.astype(dtype), w)

  def symbol_condition(self, cond_BxTx_, chunk_BxS, start_BxS):
    """Each symbol's condition: row `chunk` of the chunk-level conditions (and its slot's
    projection with 'slot_add')."""
    B, T = cond_BxTx_.shape[:2]
    if cond_BxTx_.ndim == 3:
      return jnp.take_along_axis(cond_BxTx_, chunk_BxS[..., None], axis=1)
    C = cond_BxTx_.shape[2]
    flat = chunk_BxS * C + jnp.minimum(slot_index(start_BxS), C - 1)
    return jnp.take_along_axis(cond_BxTx_.reshape(B, T * C, -1), flat[..., None], axis=1)

  def __call__(self, prev_BxS, cond_BxSxE, start_BxS, seg_BxS, *, deterministic: bool):
    cfg, b = self.cfg, self.cfg.byte_pool
    dtype = layers.dtype_of(cfg.dtype)
    cond = cond_BxSxE.astype(dtype)
    late = b.get('condition_at', 'input') == 'after_attention'
    x = self.embed(prev_BxS) + (0 if late else cond)
    x = add_slots(x, self.slots, start_BxS, b.max_bytes_per_chunk)
    group = jnp.cumsum(start_BxS, axis=1) if b.decoder_context == 'chunk' else None
    h = self.transformer(x, seg_BxS, group, deterministic=deterministic,
                         after_attention_BxLxE=cond if late else None)
    if cfg.tie_embeddings:
      logits = jnp.einsum('ble,ve->blv', h.astype(dtype), self.embed.embedding.astype(dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum('ble,ev->blv', h.astype(dtype), self.head.astype(dtype),
                          preferred_element_type=jnp.float32)
    ok = allowed_symbols(slot_index(start_BxS), b.max_bytes_per_chunk)
    return jnp.where(ok, logits.astype(jnp.float32), NEG_INF)


def previous_symbols(targets_BxS, seg_BxS):
  """Decoder inputs: the symbol before each target in its segment, END_OF_CHUNK first."""
  prev = jnp.pad(targets_BxS, ((0, 0), (1, 0)))[:, :-1]
  prev_seg = jnp.pad(seg_BxS, ((0, 0), (1, 0)))[:, :-1]
  return jnp.where(prev_seg == seg_BxS, prev, END_OF_CHUNK)


def chunk_scores(logits_BxSxV, targets_BxS, start_BxS, seg_BxS, T: int):
  """(log p of each target chunk B x T, symbols per chunk B x T, all-greedy B x T)."""
  B = targets_BxS.shape[0]
  lse = jax.nn.logsumexp(logits_BxSxV, axis=-1)
  tgt = jnp.take_along_axis(logits_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
  flat, valid = chunk_index(start_BxS, seg_BxS, T)
  lp = jnp.where(valid, tgt - lse, 0.0)
  miss = valid & (jnp.argmax(logits_BxSxV, axis=-1) != targets_BxS)
  seg_sum = lambda v: jax.ops.segment_sum(v.reshape(-1), flat.reshape(-1),
                                          num_segments=B * T).reshape(B, T)
  return (seg_sum(lp), seg_sum(valid.astype(jnp.float32)),
          seg_sum(miss.astype(jnp.float32)) == 0)


class BytePoolV2LM(nn.Module):
  """Byte-pool LM over the ragged stream layout; param tree byte_encoder / core / byte_decoder
  (so the v1 parameter report and breakdown apply unchanged)."""
  cfg: Any

  def setup(self):
    for key, value in (('encoder_context', self.cfg.byte_pool.encoder_context),
                       ('decoder_context', self.cfg.byte_pool.decoder_context)):
      if value not in CONTEXTS:
        raise ValueError(f'model.byte_pool.{key} {value!r} unknown; choose one of {CONTEXTS}')
    self.byte_encoder = StreamEncoder(self.cfg)
    from stlm.models import transformer  # pylint: disable=g-import-not-at-top
    self.core = transformer.Transformer(self.cfg, causal=True)
    self.byte_decoder = StreamDecoder(self.cfg)

  def encode(self, ids_BxS, start_BxS, seg_BxS, T: int, *, deterministic=True):
    """Input stream -> core inputs B x T x D."""
    return self.byte_encoder(ids_BxS, start_BxS, seg_BxS, T, deterministic=deterministic)

  def core_vectors(self, x_BxTxD, segment_ids_BxT, positions_BxT, *, deterministic=True,
                   decode=False):
    """Core outputs for chunk vectors; decode=True appends them to the KV cache."""
    return self.core(x_BxTxD, segment_ids_BxT, positions_BxT, deterministic=deterministic,
                     decode=decode)

  def decoder_logits(self, prev_BxS, y_BxSxD, start_BxS, seg_BxS, *, deterministic=True):
    """Masked logits with a core output per symbol (generation: one row of history)."""
    dec = self.byte_decoder
    B, S = prev_BxS.shape
    own = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))   # symbol s reads row s
    cond_BxSxE = dec.symbol_condition(dec.condition(y_BxSxD), own, start_BxS)
    return dec(prev_BxS, cond_BxSxE, start_BxS, seg_BxS, deterministic=deterministic)

  def scores(self, batch, *, deterministic=True):
    """(the __call__ dict, masked f32 logits B x S x V of every target symbol)."""
    for key in ('inputs', 'targets'):
      if batch[key].ndim != 2 or f'{key}_chunk_start' not in batch:
        raise ValueError(f'byte_pool v2 batches need {key} B x S with {key}_chunk_start and '
                         f'{key}_segment_ids (the stream layout), got {batch[key].shape}')
    T = batch['segment_ids'].shape[1]
    x = self.encode(batch['inputs'], batch['inputs_chunk_start'], batch['inputs_segment_ids'],
                    T, deterministic=deterministic)
    y_BxTxD = self.core_vectors(x, batch['segment_ids'], batch['positions'],
                                deterministic=deterministic)
    tgt, tstart, tseg = (batch['targets'], batch['targets_chunk_start'],
                         batch['targets_segment_ids'])
    # Project at chunk level, then gather per symbol: the projection runs T times, not S.
    tidx = jnp.clip(jnp.cumsum(tstart, axis=1) - 1, 0, T - 1)
    cond_BxSxE = self.byte_decoder.symbol_condition(self.byte_decoder.condition(y_BxTxD), tidx,
                                                    tstart)
    logits = self.byte_decoder(previous_symbols(tgt, tseg), cond_BxSxE, tstart, tseg,
                               deterministic=deterministic)
    logprobs, units, greedy = chunk_scores(logits, tgt, tstart, tseg, T)
    return dict(logprobs=logprobs, units=units, greedy=greedy), logits

  def __call__(self, batch, *, deterministic=True):
    return self.scores(batch, deterministic=deterministic)[0]


# ---------------------------------------------------------------- the kind's description (v2)
# (registered as the byte_pool kind's version 'v2' in stlm/models/byte_pool.py)


def validate(model_cfg) -> None:
  """The v2 keys: contexts, window, stream length, n-gram tables."""
  from stlm import config_errors  # pylint: disable=g-import-not-at-top
  b = model_cfg.byte_pool
  for key in ('encoder_context', 'decoder_context'):
    if b[key] not in CONTEXTS:
      config_errors.fail(f'model.byte_pool.{key}', b[key],
                         f'unknown value; choose one of {", ".join(CONTEXTS)}')
  if b.get('condition', 'add') not in CONDITIONS:
    config_errors.fail('model.byte_pool.condition', b.condition,
                       f'unknown value; choose one of {", ".join(CONDITIONS)}')
  if b.get('condition_at', 'input') not in CONDITION_AT:
    config_errors.fail('model.byte_pool.condition_at', b.condition_at,
                       f'unknown value; choose one of {", ".join(CONDITION_AT)}')
  if not isinstance(b.local_window, int) or b.local_window < 1:
    config_errors.fail('model.byte_pool.local_window', b.local_window, 'must be an integer >= 1')
  if b.stream_len and b.stream_len < b.max_bytes_per_chunk + 1:
    config_errors.fail('model.byte_pool.stream_len', b.stream_len,
                       f'cannot hold one chunk of model.byte_pool.max_bytes_per_chunk + 1 = '
                       f'{b.max_bytes_per_chunk + 1} symbols (0 = 5 x model.max_len)')
  if b.ngram_buckets < 0 or any(int(n) < 1 for n in b.ngram_sizes):
    config_errors.fail('model.byte_pool.ngram_sizes', tuple(b.ngram_sizes),
                       'n-gram sizes must be >= 1 and ngram_buckets >= 0')
  for enc in ('encoder', 'decoder'):
    heads = b[f'{enc}_heads']
    if (b.byte_dim // heads) % 2:
      config_errors.fail(f'model.byte_pool.{enc}_heads', heads,
                         f'gives an odd head size {b.byte_dim // heads} (RoPE needs even)')

# GPT-2 chunk lengths (bytes, split at 16) measured on the first 200 documents of
# ../shared/data/corpus/wikipedia_en/shard_00.jsonl (mean 3.16): synthetic benchmark rows get
# real-looking streams, so a benchmark times what training computes.
CHUNK_LENGTH_PROBS = (0.4638, 0.104, 0.1039, 0.0914, 0.0621, 0.0434, 0.0327, 0.0302, 0.0222,
                      0.0148, 0.0089, 0.0055, 0.0024, 0.002, 0.0006, 0.0121)


def _stream_len(model_cfg) -> int:
  b = model_cfg.byte_pool
  return byte_ids.stream_len(model_cfg.max_len, b.max_bytes_per_chunk, b.get('stream_len', 0))


def dummy_batch(model_cfg, batch_size: int = 1, seq_len: int | None = None):
  """Zeros in the stream layout (one segment, one symbol per chunk): init and shapes only."""
  T = seq_len or min(model_cfg.max_len, 16)
  S = max(_stream_len(model_cfg) * T // model_cfg.max_len, model_cfg.byte_pool.max_bytes_per_chunk + 1)
  B = batch_size
  ones_S = np.ones((B, S), np.int32)
  return dict(
      inputs=np.full((B, S), BYTE_OFFSET, np.int32), inputs_chunk_start=ones_S.copy(),
      inputs_segment_ids=ones_S.copy(), targets=np.full((B, S), END_OF_CHUNK, np.int32),
      targets_chunk_start=ones_S.copy(), targets_segment_ids=ones_S.copy(),
      segment_ids=np.ones((B, T), np.int32),
      positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
      loss_mask=np.ones((B, T), np.float32), target_bytes=np.ones((B, T), np.int32))


def synthetic_row(model_cfg, rng: np.random.Generator):
  """One packed row of random text chunks (CHUNK_LENGTH_PROBS): chunks until T or the stream
  is full; returns the row's arrays."""
  T, S = model_cfg.max_len, _stream_len(model_cfg)
  max_bytes = model_cfg.byte_pool.max_bytes_per_chunk
  probs = np.asarray(CHUNK_LENGTH_PROBS[:max_bytes])
  lengths = rng.choice(np.arange(1, len(probs) + 1), size=T + 1, p=probs / probs.sum())
  sym = lengths + 1
  # Chunks 0..n-1 as inputs, 1..n as targets; both streams must fit S.
  n = T
  while max(sym[:n].sum(), sym[1:n + 1].sum()) > S:
    n -= 1
  ids = [np.append(rng.integers(BYTE_OFFSET, BYTE_VOCAB, k), END_OF_CHUNK) for k in lengths]
  row = {}
  for key, part in (('inputs', ids[:n]), ('targets', ids[1:n + 1])):
    flat = np.concatenate(part).astype(np.int32)
    start = np.zeros(len(flat), np.int32)
    start[np.cumsum([0] + [len(p) for p in part[:-1]])] = 1
    row[key] = np.pad(flat, (0, S - len(flat)))
    row[f'{key}_chunk_start'] = np.pad(start, (0, S - len(flat)))
    row[f'{key}_segment_ids'] = np.pad(np.ones(len(flat), np.int32), (0, S - len(flat)))
  real = np.arange(T) < n
  row.update(segment_ids=real.astype(np.int32), positions=np.where(real, np.arange(T), 0),
             loss_mask=real.astype(np.float32),
             target_bytes=np.where(real, np.pad(lengths[1:n + 1], (0, T - n)), 0).astype(np.int32))
  return row


def synthetic_batch(model_cfg, rng: np.random.Generator, leading_shape):
  """Rows of `synthetic_row`, stacked to leading_shape + (T or S,)."""
  leading_shape = tuple(leading_shape)
  rows = [synthetic_row(model_cfg, rng) for _ in range(int(np.prod(leading_shape)))]
  return {k: np.stack([r[k] for r in rows]).reshape(leading_shape + rows[0][k].shape)
          for k in rows[0]}


def flops_per_target(model_cfg, breakdown) -> float:
  """Training FLOPs per chunk position: 6 x core params + core attention, plus the local
  models' matmuls and windowed attention for every symbol slot of the stream (padding
  included: it is computed), i.e. stream_len / max_len symbols per chunk position."""
  m, b = model_cfg, model_cfg.byte_pool
  E = b.byte_dim
  per_symbol_params = 0
  for n_layers, ffn in ((b.encoder_layers, b.encoder_ffn_dim), (b.decoder_layers, b.decoder_ffn_dim)):
    per_symbol_params += n_layers * (4 * E * E + (3 if m.ffn_type == 'swiglu' else 2) * E * ffn)
  per_symbol_params += E * BYTE_VOCAB  # the output layer
  # Windowed attention: scores and mixing against 2 x window keys (block-wise), per layer.
  attn = 12 * (b.encoder_layers + b.decoder_layers) * 2 * b.local_window * E
  symbols = _stream_len(m) / m.max_len
  from_core_rows = b.max_bytes_per_chunk + 1 if b.get('condition', 'add') == 'slot_add' else 1
  core_attn = 12 * m.num_layers * m.max_len * m.hidden_dim / 2
  return 6 * breakdown['core'] + core_attn + symbols * (6 * per_symbol_params + attn) \
      + 6 * (1 + from_core_rows) * m.hidden_dim * E   # to_core and from_core, per chunk
