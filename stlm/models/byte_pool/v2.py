"""The byte-pool LM, second generation: local byte-stream encoder and decoder around the core.

Batches are in the ragged stream layout of `stlm/data/byte_stream.py`: a row holds its chunks'
symbols back to back (bytes + END_OF_CHUNK, or EOT), so no compute goes to per-chunk padding.

- Encoder: byte embeddings (+ hashed byte n-gram embeddings, BLT) -> a causal sliding-window
  transformer over the input stream (a symbol sees the `local_window - 1` symbols before it,
  earlier chunks included, later ones never) -> one vector per chunk by segment reductions
  (mean, last or attention pooling) -> the core's width; or (pooling 'slots', MEGABYTE) the
  chunk's symbol states by slot, concatenated and projected, so the vector keeps byte order.
- Core: the baseline's causal `Transformer` over chunks.
- Decoder: over the target stream, each symbol's input is the previous symbol (+ its slot
  embedding); the projected core output of the chunk before its chunk joins the residual
  stream after the first attention sub-block (condition_at 'after_attention', the default;
  'input' adds it to the input). Or, with condition 'cross_attention' (BLT), the symbol
  attends there to the last `cross_chunks` core outputs of its document; condition_at
  'every_layer' makes it enter before every decoder block (BLT's cross-attention in all
  decoder layers), with its own queries per block. A causal sliding-window transformer, so a
  byte of chunk t+1 sees y_t and the bytes before it, including the previous chunks'
  (decoder_context 'window'; 'chunk' limits it to its own chunk, like v1 and MEGABYTE, so
  the core is its only view of earlier chunks).

Why after the first attention: added at the input, the core vector (constant over a chunk,
different across chunks) dominates the first layer's queries and keys, and the window decoder
stalls early in training; entering after the first attention lets that attention learn byte
patterns first (the ablation rows of stlm/experiments/variants.py compare both).
Slot embeddings (slot_embedding, a learned vector per slot of a chunk) give each symbol its
slot, which v1's per-chunk rows give by position.

The logits are masked per slot exactly as v1's (`slot j` = symbol index within its chunk): no
PAD, EOT only first, no END_OF_CHUNK first, only END_OF_CHUNK after max_bytes bytes. So the
per-chunk sums are exact log-probabilities of the chunk sequence and the outputs keep the
contract of every LM: logprobs / units / greedy per chunk target, B x T.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from stlm.models import layers
from stlm.ids import BYTE_OFFSET, BYTE_VOCAB, END_OF_CHUNK, EOT
from stlm.models.byte_pool import local_transformer as local
from stlm.models.byte_pool import slot_classes
from stlm.models.byte_pool.paper import POOLINGS

NEG_INF = -1e30
# As in v1: chunk vectors enter the core, and core vectors the decoder, at embedding scale.
PROJ_INIT = layers.fan_in_init(scale=0.02 ** 2)
# model.byte_pool.encoder_context / decoder_context -> whether a symbol sees only the bytes
# of its own chunk ('chunk') or also earlier chunks' within the window ('window').
CONTEXTS = {'window': False, 'chunk': True}


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the core's condition joins the decoder's residual stream (model.byte_pool.
  condition_at): at its input, after the first attention sub-block, or before every block's
  attention (so it steers the byte attention of every layer, as BLT's decoder)."""
  at_input: bool = False
  after_first_attention: bool = False
  every_block: bool = False


CONDITION_AT = {'input': Placement(at_input=True),
                'after_attention': Placement(after_first_attention=True),
                'every_layer': Placement(every_block=True)}


@dataclasses.dataclass(frozen=True)
class Condition:
  """How a decoder symbol reads the core (model.byte_pool.condition): one projection of its
  chunk's core output added, one projection per slot (MEGABYTE), or cross-attention to the
  last cross_chunks core outputs (BLT)."""
  per_slot: bool = False
  cross_attention: bool = False


CONDITIONS = {'add': Condition(), 'slot_add': Condition(per_slot=True),
              'cross_attention': Condition(cross_attention=True)}
_HASH_MUL = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C,
             0xFD7046C5, 0xB55A4F09)


def condition(cfg) -> Condition:
  return CONDITIONS[cfg.byte_pool.condition]


def attention_window(b, context: str) -> int:
  """Sliding window of a local model with `context` (encoder_context / decoder_context): the
  configured local_window, or with 'chunk' at most one chunk (max_bytes + 1 symbols), which
  every key its chunk mask lets through already lies within, so it computes only those."""
  if CONTEXTS[context]:
    return min(b.local_window, b.max_bytes_per_chunk + 1)
  return b.local_window


def cross_queries(cfg) -> int:
  """Query sets of the decoder's cross-attention: one per decoder block with condition_at
  'every_layer', else one."""
  return cfg.byte_pool.decoder_layers if CONDITION_AT[cfg.byte_pool.condition_at].every_block \
      else 1


def memory_chunks(cfg) -> int:
  """Core outputs each decoder symbol reads: model.byte_pool.cross_chunks with
  cross-attention, else 1 (its own chunk's)."""
  return cfg.byte_pool.cross_chunks if condition(cfg).cross_attention else 1


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
  if not b.slot_embedding:
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


def ngram_tables(b):
  """(param name, n, salt) of every hashed n-gram table: model.byte_pool.ngram_hashes hash
  functions (BLT) per size in ngram_sizes; none with ngram_buckets 0."""
  if not b.ngram_buckets:
    return []
  return [(f'ngram_{n}' if k == 0 else f'ngram_{n}_{k}', n, 1 + i + 101 * k)
          for k in range(b.ngram_hashes) for i, n in enumerate(b.ngram_sizes)]


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
                           ffn_dim=b.encoder_ffn_dim, window=attention_window(b, b.encoder_context),
                           vocab=BYTE_VOCAB)
    B, S = ids_BxS.shape
    E = b.byte_dim
    dtype = layers.dtype_of(cfg.dtype)
    x = layers.TokenEmbedding(ecfg, name='embed')(ids_BxS)
    for name, n, salt in ngram_tables(b):
      table = layers.make_param(self, name, layers.EMBED_INIT, (b.ngram_buckets, E),
                                ('vocab', 'embed'), ecfg)
      x = x + jnp.take(table, ngram_hash(ids_BxS, seg_BxS, n, b.ngram_buckets, salt),
                       axis=0).astype(dtype)
    x = add_slots(x, slot_table(self, cfg, ecfg), start_BxS, b.max_bytes_per_chunk)
    group = jnp.cumsum(start_BxS, axis=1) if CONTEXTS[b.encoder_context] else None
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
    elif b.pooling == 'slots':
      return self.slot_concat(h_NxE, flat_N, start_BxS, B, T)
    else:
      raise ValueError(f'model.byte_pool.pooling {b.pooling!r} unknown; choose one of '
                       f'{", ".join(POOLINGS)}')
    w = layers.make_param(self, 'to_core', PROJ_INIT, (E, cfg.hidden_dim), (None, 'embed'), cfg)
    x_BxTxD = jnp.einsum('ne,ed->nd', pooled.astype(dtype), w.astype(dtype))
    return x_BxTxD.reshape(B, T, cfg.hidden_dim)

  def slot_concat(self, h_NxE, flat_N, start_BxS, B: int, T: int):
    """Pooling 'slots': each chunk's symbol states laid out by slot (C = max_bytes + 1 slots,
    empty ones zero), concatenated and projected to the core's width: B x T x D."""
    cfg, b = self.cfg, self.cfg.byte_pool
    C, E = b.max_bytes_per_chunk + 1, b.byte_dim
    dtype = layers.dtype_of(cfg.dtype)
    slot_N = jnp.minimum(slot_index(start_BxS), C - 1).reshape(-1)
    cell_N = jnp.where(flat_N < B * T, flat_N * C + slot_N, B * T * C)   # padding dropped
    grid = jax.ops.segment_sum(h_NxE, cell_N, num_segments=B * T * C)
    w = layers.make_param(self, 'slots_to_core', layers.fan_in_init(1, 2, 0.02 ** 2),
                          (C, E, cfg.hidden_dim), (None, None, 'embed'), cfg)
    x = jnp.einsum('nce,ced->nd', grid.reshape(B * T, C, E).astype(dtype), w.astype(dtype))
    return x.reshape(B, T, cfg.hidden_dim)


class StreamDecoder(nn.Module):
  """Previous symbols + per-symbol condition -> masked f32 logits B x S x V."""
  cfg: Any

  def setup(self):
    cfg, b = self.cfg, self.cfg.byte_pool
    self.dcfg = local.local_cfg(cfg, num_layers=b.decoder_layers, num_heads=b.decoder_heads,
                                ffn_dim=b.decoder_ffn_dim,
                                window=attention_window(b, b.decoder_context),
                                vocab=BYTE_VOCAB)
    if condition(cfg).cross_attention:
      self.cross = local.CoreCrossAttention(self.dcfg, cfg.hidden_dim, memory_chunks(cfg),
                                            cross_queries(cfg))
    elif condition(cfg).per_slot:
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

  def chunk_condition(self, y_BxTxD, seg_BxT):
    """Core outputs -> per-chunk conditions: an array (see `condition`) or, with
    'cross_attention', keys / values / validity of each chunk's core-output memory."""
    if hasattr(self, 'cross'):
      return self.cross.memory(y_BxTxD, seg_BxT)
    return self.condition(y_BxTxD)

  def memory_condition(self, y_BxSxKxD, valid_BxSxK, start_BxS):
    """Generation: each symbol's last K core outputs (oldest first; K = memory_chunks) ->
    its condition."""
    if hasattr(self, 'cross'):
      return self.cross.project(y_BxSxKxD) + (valid_BxSxK,)
    B, S = start_BxS.shape
    own = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))   # symbol s reads row s
    return self.symbol_condition(self.condition(y_BxSxKxD[:, :, -1]), own, start_BxS)

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
    if isinstance(cond_BxTx_, tuple):   # cross-attention memory: gather every part
      index = lambda a: chunk_BxS.reshape(chunk_BxS.shape + (1,) * (a.ndim - 2))
      return tuple(jnp.take_along_axis(a, index(a), axis=1) for a in cond_BxTx_)
    B, T = cond_BxTx_.shape[:2]
    if cond_BxTx_.ndim == 3:
      return jnp.take_along_axis(cond_BxTx_, chunk_BxS[..., None], axis=1)
    C = cond_BxTx_.shape[2]
    flat = chunk_BxS * C + jnp.minimum(slot_index(start_BxS), C - 1)
    return jnp.take_along_axis(cond_BxTx_.reshape(B, T * C, -1), flat[..., None], axis=1)

  def __call__(self, prev_BxS, cond_BxSxE, start_BxS, seg_BxS, *, deterministic: bool):
    cfg, b = self.cfg, self.cfg.byte_pool
    dtype = layers.dtype_of(cfg.dtype)
    if isinstance(cond_BxSxE, tuple):
      cond_of = lambda x, i: self.cross.attend(x, *cond_BxSxE, query=i)
    else:
      cond_of = lambda x, i: cond_BxSxE.astype(dtype)
    where = CONDITION_AT[b.condition_at]
    x = self.embed(prev_BxS)
    x = x + cond_of(x, 0) if where.at_input else x
    x = add_slots(x, self.slots, start_BxS, b.max_bytes_per_chunk)
    group = jnp.cumsum(start_BxS, axis=1) if CONTEXTS[b.decoder_context] else None
    h = self.transformer(x, seg_BxS, group, deterministic=deterministic,
                         after_attention=cond_of if where.after_first_attention else None,
                         before_block=cond_of if where.every_block else None)
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


def symbol_logprobs(logits_BxSxV, targets_BxS):
  """log p of each target symbol f32 B x S (padding included: mask it)."""
  lse = jax.nn.logsumexp(logits_BxSxV, axis=-1)
  tgt = jnp.take_along_axis(logits_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
  return tgt - lse


def chunk_summer(start_BxS, seg_BxS, T: int):
  """(fn: per-symbol B x S -> per-chunk sums B x T, bool B x S of the symbols in a chunk)."""
  B = start_BxS.shape[0]
  flat, valid = chunk_index(start_BxS, seg_BxS, T)
  seg_sum = lambda v: jax.ops.segment_sum(v.reshape(-1), flat.reshape(-1),
                                          num_segments=B * T).reshape(B, T)
  return seg_sum, valid


def chunk_scores(logits_BxSxV, targets_BxS, start_BxS, seg_BxS, T: int):
  """(log p of each target chunk B x T, symbols per chunk B x T, all-greedy B x T)."""
  seg_sum, valid = chunk_summer(start_BxS, seg_BxS, T)
  lp = jnp.where(valid, symbol_logprobs(logits_BxSxV, targets_BxS), 0.0)
  miss = valid & (jnp.argmax(logits_BxSxV, axis=-1) != targets_BxS)
  return (seg_sum(lp), seg_sum(valid.astype(jnp.float32)),
          seg_sum(miss.astype(jnp.float32)) == 0)


class BytePoolV2LM(nn.Module):
  """Byte-pool LM over the ragged stream layout; param tree byte_encoder / core / byte_decoder
  (so the v1 parameter report and breakdown apply unchanged).

  core_transform: None (the model), or fn(y_BxTxD, segment_ids_BxT) -> y_BxTxD applied to
  the core outputs before the decoder reads them in `scores` (diagnostics: what the decoder
  loses without the core's information); it adds no params, so `clone(core_transform=fn)`
  runs with the model's params.
  """
  cfg: Any
  core_transform: Callable[[jax.Array, jax.Array], jax.Array] | None = None

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

  def decoder_logits(self, prev_BxS, y_BxSxKxD, valid_BxSxK, start_BxS, seg_BxS, *,
                     deterministic=True):
    """Masked logits with each symbol's last K core outputs (generation: one row of
    history; K = memory_chunks(cfg), oldest first, valid where the output exists)."""
    dec = self.byte_decoder
    cond = dec.memory_condition(y_BxSxKxD, valid_BxSxK, start_BxS)
    return dec(prev_BxS, cond, start_BxS, seg_BxS, deterministic=deterministic)

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
    if self.core_transform is not None:
      y_BxTxD = self.core_transform(y_BxTxD, batch['segment_ids'])
    tgt, tstart, tseg = (batch['targets'], batch['targets_chunk_start'],
                         batch['targets_segment_ids'])
    # Project at chunk level, then gather per symbol: the projection runs T times, not S.
    tidx = jnp.clip(jnp.cumsum(tstart, axis=1) - 1, 0, T - 1)
    dec = self.byte_decoder
    cond_BxSxE = dec.symbol_condition(dec.chunk_condition(y_BxTxD, batch['segment_ids']), tidx,
                                      tstart)
    logits = self.byte_decoder(previous_symbols(tgt, tseg), cond_BxSxE, tstart, tseg,
                               deterministic=deterministic)
    logprobs, units, greedy = chunk_scores(logits, tgt, tstart, tseg, T)
    return dict(logprobs=logprobs, units=units, greedy=greedy), logits

  def slot_class_scores(self, batch, *, deterministic=True):
    """Slot class (slot_classes.CLASSES) -> (summed log p of its symbols, symbols), each
    f32 B x T per target chunk; the classes' log p add up to __call__'s logprobs."""
    _, logits = self.scores(batch, deterministic=deterministic)
    tgt, tstart = batch['targets'], batch['targets_chunk_start']
    seg_sum, valid = chunk_summer(tstart, batch['targets_segment_ids'],
                                  batch['segment_ids'].shape[1])
    masks = slot_classes.class_masks(tgt, slot_index(tstart), valid)
    return slot_classes.class_sums(symbol_logprobs(logits, tgt), masks, seg_sum)

  def __call__(self, batch, *, deterministic=True):
    return self.scores(batch, deterministic=deterministic)[0]
