"""The byte-pool kind's description for version 'v2' (validation, dummy and synthetic
batches in the stream layout, FLOPs): what stlm/models/byte_pool/paper.py's registry entry asks
when model.byte_pool.version == 'v2'. The model itself is in byte_pool_v2.py."""

import numpy as np

from stlm.config import errors as config_errors

from stlm.data import layout
from stlm.models import layers
from stlm.ids import BYTE_OFFSET, BYTE_VOCAB, END_OF_CHUNK
from stlm.models.byte_pool.v2 import (CONDITION_AT, CONDITIONS, CONTEXTS, POOLINGS,
                                      attention_window, cross_queries, memory_chunks)


def validate(model_cfg) -> None:
  """The v2 keys: contexts, window, stream length, n-gram tables."""
  b = model_cfg.byte_pool
  for key in ('encoder_context', 'decoder_context'):
    if b[key] not in CONTEXTS:
      config_errors.fail(f'model.byte_pool.{key}', b[key],
                         f'unknown value; choose one of {", ".join(CONTEXTS)}')
  if b.condition not in CONDITIONS:
    config_errors.fail('model.byte_pool.condition', b.condition,
                       f'unknown value; choose one of {", ".join(CONDITIONS)}')
  chunks = memory_chunks(model_cfg)
  if not isinstance(chunks, int) or chunks < 1:
    config_errors.fail('model.byte_pool.cross_chunks', chunks, 'must be an integer >= 1')
  if b.condition_at not in CONDITION_AT:
    config_errors.fail('model.byte_pool.condition_at', b.condition_at,
                       f'unknown value; choose one of {", ".join(CONDITION_AT)}')
  if not isinstance(b.local_window, int) or b.local_window < 1:
    config_errors.fail('model.byte_pool.local_window', b.local_window, 'must be an integer >= 1')
  if b.stream_len and b.stream_len < b.max_bytes_per_chunk + 1:
    config_errors.fail('model.byte_pool.stream_len', b.stream_len,
                       f'cannot hold one chunk of model.byte_pool.max_bytes_per_chunk + 1 = '
                       f'{b.max_bytes_per_chunk + 1} symbols (0 = 5 x model.max_len)')
  if b.pooling not in POOLINGS:
    config_errors.fail('model.byte_pool.pooling', b.pooling,
                       f'unknown value for version v2; choose one of {", ".join(POOLINGS)}')
  if not isinstance(b.ngram_hashes, int) or b.ngram_hashes < 1:
    config_errors.fail('model.byte_pool.ngram_hashes', b.ngram_hashes, 'must be an integer >= 1')
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
  return layout.stream_len(model_cfg.max_len, b.max_bytes_per_chunk, b.stream_len)


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
    per_symbol_params += n_layers * (4 * E * E + layers.ffn_variant(m).matrices * E * ffn)
  per_symbol_params += E * BYTE_VOCAB  # the output layer
  # Windowed attention: scores and mixing against 2 x window keys (block-wise), per layer.
  attn = 12 * 2 * E * (b.encoder_layers * attention_window(b, b.encoder_context)
                       + b.decoder_layers * attention_window(b, b.decoder_context))
  symbols = _stream_len(m) / m.max_len
  condition = CONDITIONS[b.condition]
  from_core_rows = b.max_bytes_per_chunk + 1 if condition.per_slot else 1
  if condition.cross_attention:
    queries = cross_queries(m)
    per_symbol_params += 2 * E * E * queries           # query and output projections
    attn += 12 * memory_chunks(m) * E * queries         # scores and mixing over the outputs read
    from_core_rows = 2                                  # key and value projections, per chunk
  to_core_rows = 1
  if b.pooling == 'slots':
    to_core_rows = b.max_bytes_per_chunk + 1           # one E x D block per slot
  core_attn = 12 * m.num_layers * m.max_len * m.hidden_dim / 2
  return 6 * breakdown['core'] + core_attn + symbols * (6 * per_symbol_params + attn) \
      + 6 * (to_core_rows + from_core_rows) * m.hidden_dim * E   # to and from the core
