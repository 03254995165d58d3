"""Ragged byte-stream layout of the byte-pool model v2: chunks back to back, no pad slots.

The chunks of a document (BPE-bounded, long pieces split at max_bytes, see chunking.py) are
`[EOT] + chunks + [EOT]` as in v1. Each chunk is written as SYMBOLS: its byte ids then
END_OF_CHUNK; the end-of-text chunk is the single symbol EOT. An example holds

  inputs               int32 [S_in]  symbols of the input chunks s .. e-1, back to back
  inputs_chunk_start   int32 [S_in]  1 on the first symbol of every chunk
  targets              int32 [S_tgt] symbols of the target chunks s+1 .. e (the next chunks)
  targets_chunk_start  int32 [S_tgt] 1 on the first symbol of every target chunk
  loss_mask            f32 [n]       chunk level (n = e - s targets): 1 on real targets
  target_bytes         int32 [n]     UTF-8 bytes of each target chunk (0 for end-of-text)

so a window never splits a chunk, n <= max_len and S_in, S_tgt <= stream_len. Packing puts
several examples in one row (grain adds `<key>_segment_ids` / `<key>_positions` per key);
per-symbol chunk indices are recovered in the model as cumsum(chunk_start) - 1, which agrees
with the chunk-level packing because every example adds as many chunk starts as chunks.
The decoder's inputs are the target stream shifted by one symbol (END_OF_CHUNK first).
"""

from __future__ import annotations

import numpy as np

from stlm.data import layout
from stlm.data import chunking
from stlm.data.chunking import BYTE_OFFSET, END_OF_CHUNK, EOT

STREAM_KEYS = ('inputs', 'inputs_chunk_start', 'targets', 'targets_chunk_start')
CHUNK_KEYS = ('loss_mask', 'target_bytes')
EXAMPLE_KEYS = STREAM_KEYS + CHUNK_KEYS
def chunk_symbols(chunks: list[bytes]):
  """(flat symbol ids, symbols per chunk) of chunks written as bytes + END_OF_CHUNK."""
  lengths = np.fromiter((len(c) + 1 for c in chunks), np.int64, count=len(chunks))
  ids = np.full(int(lengths.sum()), END_OF_CHUNK, np.int32)
  if len(chunks):
    data = np.frombuffer(b''.join(chunks), np.uint8).astype(np.int32) + BYTE_OFFSET
    ends = np.cumsum(lengths) - 1            # END_OF_CHUNK slots
    keep = np.ones(len(ids), bool)
    keep[ends] = False
    ids[keep] = data
  return ids, lengths


def stream_to_bytes(ids) -> bytes:
  """The text bytes of a symbol stream (markers dropped): inverse of the layout."""
  ids = np.asarray(ids).reshape(-1)
  return (ids[ids >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tobytes()


class Sequence:
  """Symbols of a chunk sequence with per-chunk offsets, for slicing windows of chunks."""

  def __init__(self, chunks: list[bytes], *, eot_start: bool, eot_end: bool):
    ids, lengths = chunk_symbols(chunks)
    parts_ids, parts_len = [ids], [lengths]
    eot_ids, one = np.array([EOT], np.int32), np.array([1], np.int64)
    if eot_start:
      parts_ids.insert(0, eot_ids), parts_len.insert(0, one)
    if eot_end:
      parts_ids.append(eot_ids), parts_len.append(one)
    self.ids = np.concatenate(parts_ids)
    sym = np.concatenate(parts_len)
    self.offsets = np.concatenate([[0], np.cumsum(sym)]).astype(np.int64)  # chunk k: [o_k, o_k+1)
    # Text bytes per chunk (EOT chunks 0): symbols - 1 for text chunks.
    self.nbytes = np.where(sym == 1, 0, sym - 1).astype(np.int32)
    if eot_start:
      self.nbytes[0] = 0
    if eot_end:
      self.nbytes[-1] = 0
    self.num_chunks = len(sym)

  def symbols(self, a: int, b: int):
    """(ids, chunk-start flags) of chunks a .. b-1."""
    lo, hi = self.offsets[a], self.offsets[b]
    starts = np.zeros(hi - lo, np.int32)
    starts[self.offsets[a:b] - lo] = 1
    return self.ids[lo:hi], starts

  def example(self, s: int, e: int) -> dict[str, np.ndarray]:
    """Input chunks s .. e-1 and target chunks s+1 .. e."""
    inputs, in_start = self.symbols(s, e)
    targets, tgt_start = self.symbols(s + 1, e + 1)
    return {
        'inputs': inputs, 'inputs_chunk_start': in_start,
        'targets': targets, 'targets_chunk_start': tgt_start,
        'loss_mask': np.ones((e - s,), np.float32),
        'target_bytes': self.nbytes[s + 1:e + 1].copy(),
    }

  def windows(self, max_len: int, stream_len: int) -> list[tuple[int, int]]:
    """[s, e) of consecutive windows: every target once, <= max_len targets, streams fit."""
    o, n_targets = self.offsets, self.num_chunks - 1
    out, s = [], 0
    while s < n_targets:
      e = min(s + max_len, n_targets)
      # Input stream o[e] - o[s] and target stream o[e+1] - o[s+1] within stream_len.
      e = min(e, int(np.searchsorted(o, o[s] + stream_len, 'right')) - 1)
      e = min(e, int(np.searchsorted(o, o[s + 1] + stream_len, 'right')) - 2)
      if e <= s:  # cannot happen once stream_len >= max_bytes + 1 (checked at construction)
        raise AssertionError(f'chunk {s + 1} does not fit a stream of {stream_len} symbols')
      out.append((s, e))
      s = e
    return out


class StreamFeaturizer:
  """Byte-pool v2 featurizer: the interface of `ChunkFeaturizer`, in the stream layout."""

  def __init__(self, tokenizer, max_len: int, max_bytes_per_chunk: int = 16,
               stream_len_: int = 0):
    if max_len < 1:
      raise ValueError(f'model.max_len must be >= 1, got {max_len}')
    if max_bytes_per_chunk < 1:
      raise ValueError('model.byte_pool.max_bytes_per_chunk must be >= 1, '
                       f'got {max_bytes_per_chunk}')
    self.tokenizer = tokenizer
    self.max_len = int(max_len)
    self.max_bytes = int(max_bytes_per_chunk)
    self.stream_len = layout.stream_len(self.max_len, self.max_bytes, stream_len_)

  def chunks(self, text: str | bytes) -> list[bytes]:
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return chunking.chunk_bytes(data, self.tokenizer, self.max_bytes)

  def document(self, text: str) -> list[dict[str, np.ndarray]]:
    """Windows over `[eot] + chunks + [eot]`: consecutive windows share one chunk (the
    last target of one is the first input of the next), so every target appears once."""
    chunks = self.chunks(text)
    if not chunks:
      return []
    seq = Sequence(chunks, eot_start=True, eot_end=True)
    return [seq.example(s, e) for s, e in seq.windows(self.max_len, self.stream_len)]

  def conversation(self, pieces: list[tuple[str, bool]]) -> list[dict[str, np.ndarray]]:
    """Windows (as `document`) over `[eot] + chunks(piece_1) + ... + [eot]`, each piece
    chunked on its own, so every chunk is wholly prompt or wholly response and a masked
    chunk's likelihood is exactly its bytes'. loss_mask is 1 only on chunks of flagged
    pieces (the closing end-of-text takes the last piece's flag); windows with no flagged
    target are dropped."""
    chunks, flag_N = chunking.conversation_chunks(self.chunks, pieces)
    if not chunks:
      return []
    seq = Sequence(chunks, eot_start=True, eot_end=True)
    out = []
    for s, e in seq.windows(self.max_len, self.stream_len):
      example = seq.example(s, e)
      example['loss_mask'] = flag_N[s + 1:e + 1]
      if example['loss_mask'].any():
        out.append(example)
    return out

  def pair(self, context: str, continuation: str, *, always_prefix_eot: bool = False
           ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`chunks(context) + chunks(continuation)` (chunked separately); mask of the
    continuation's targets. Trailing context whitespace moves to the continuation; the
    end-of-text chunk is prepended only to an empty context (lm-evaluation-harness's
    prefix token), or always with `always_prefix_eot`."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx, cont = self.chunks(context), self.chunks(continuation)
    prefix = 1 if always_prefix_eot or not ctx else 0
    seq = Sequence(ctx + cont, eot_start=bool(prefix), eot_end=False)
    example = seq.example(0, seq.num_chunks - 1)
    mask = np.zeros(seq.num_chunks - 1, bool)
    mask[prefix + len(ctx) - 1:] = True
    return example, mask

  # ------------------------------------------------------------------ packing and batching

  def length_struct(self) -> dict[str, int]:
    """Per-key row lengths for grain's packer: chunk keys max_len, stream keys stream_len."""
    return {k: (self.stream_len if k in STREAM_KEYS else self.max_len) for k in EXAMPLE_KEYS}

  @staticmethod
  def to_batch_row(packed) -> dict[str, np.ndarray]:
    """grain's packed features -> the v2 batch layout (chunk segment ids from loss_mask)."""
    row = {k: packed[k] for k in EXAMPLE_KEYS}
    row['inputs_segment_ids'] = packed['inputs_segment_ids']
    row['targets_segment_ids'] = packed['targets_segment_ids']
    row['segment_ids'] = packed['loss_mask_segment_ids']
    row['positions'] = packed['loss_mask_positions']
    return row

  def empty_batch(self, batch: int) -> dict[str, np.ndarray]:
    """All-padding batch of the packed layout (for fixed-count evaluation)."""
    out = {}
    for k in EXAMPLE_KEYS + ('inputs_segment_ids', 'targets_segment_ids', 'segment_ids',
                             'positions'):
      stream = k in STREAM_KEYS or k.endswith('s_segment_ids')
      dtype = np.float32 if k == 'loss_mask' else np.int32
      out[k] = np.zeros((batch, self.stream_len if stream else self.max_len), dtype)
    return out

  def batch_spans(self, spans, batch_size: int, T: int) -> dict[str, np.ndarray]:
    """Scorer batch of (example, lo, hi) windows over chunk targets: one window per row,
    streams padded to a power of two (>= 16) so compilations stay few."""
    rows = []
    for example, lo, hi in spans:
      in_starts = np.flatnonzero(example['inputs_chunk_start'])
      tgt_starts = np.flatnonzero(example['targets_chunk_start'])
      in_bounds = np.append(in_starts, len(example['inputs']))
      tgt_bounds = np.append(tgt_starts, len(example['targets']))
      rows.append((example['inputs'][in_bounds[lo]:in_bounds[hi]],
                   example['inputs_chunk_start'][in_bounds[lo]:in_bounds[hi]],
                   example['targets'][tgt_bounds[lo]:tgt_bounds[hi]],
                   example['targets_chunk_start'][tgt_bounds[lo]:tgt_bounds[hi]],
                   example['loss_mask'][lo:hi], example['target_bytes'][lo:hi]))
    longest = max(max(len(r[0]), len(r[2])) for r in rows)
    S = 16
    while S < longest:
      S *= 2
    B = batch_size
    batch = {k: np.zeros((B, S), np.int32) for k in STREAM_KEYS}
    batch.update(inputs_segment_ids=np.zeros((B, S), np.int32),
                 targets_segment_ids=np.zeros((B, S), np.int32),
                 loss_mask=np.zeros((B, T), np.float32), target_bytes=np.zeros((B, T), np.int32),
                 segment_ids=np.zeros((B, T), np.int32), positions=np.zeros((B, T), np.int32))
    for r, (ids, ist, tgt, tst, lm, tb) in enumerate(rows):
      n = len(lm)
      batch['inputs'][r, :len(ids)], batch['inputs_chunk_start'][r, :len(ids)] = ids, ist
      batch['targets'][r, :len(tgt)], batch['targets_chunk_start'][r, :len(tgt)] = tgt, tst
      batch['inputs_segment_ids'][r, :len(ids)] = 1
      batch['targets_segment_ids'][r, :len(tgt)] = 1
      batch['loss_mask'][r, :n], batch['target_bytes'][r, :n] = lm, tb
      batch['segment_ids'][r, :n] = 1
      batch['positions'][r, :n] = np.arange(n)
    return batch


def make_stream_featurizer(config, tokenizer) -> StreamFeaturizer:
  b = config.model.byte_pool
  return StreamFeaturizer(tokenizer, config.model.max_len, b.max_bytes_per_chunk,
                          b.get('stream_len', 0))
