"""Byte chunking for the byte-pool model: bytes cut at BPE boundaries, padded id rows.

The tokenizer only supplies boundaries (`Tokenizer.split_bytes`), never ids or
embeddings. A piece longer than `max_bytes` becomes several chunks, so
`b''.join(chunk_bytes(data, ...)) == data` for every byte string.

Byte ids are those of `stlm/ids.py` (PAD, END_OF_CHUNK, EOT, byte b -> b + 3).
Rows are `C = max_bytes + 1` wide: a full chunk of max_bytes bytes still has room for its
END_OF_CHUNK. An input row holds the chunk's byte ids then PAD; a target row holds the
next chunk's byte ids, END_OF_CHUNK, then PAD (or EOT, then PAD).
"""

from __future__ import annotations

import numpy as np

from stlm.data.layout import chunk_width
from stlm.ids import BYTE_OFFSET, BYTE_VOCAB, END_OF_CHUNK, EOT, PAD  # pylint: disable=unused-import (re-exported)


def chunk_bytes(data: bytes, tokenizer, max_bytes: int) -> list[bytes]:
  """`data` cut at the tokenizer's boundaries, long pieces split every `max_bytes` bytes."""
  if max_bytes < 1:
    raise ValueError(f'model.byte_pool.max_bytes_per_chunk must be >= 1, got {max_bytes}')
  data = bytes(data)
  pieces = tokenizer.split_bytes(data) if data else []
  if b''.join(pieces) != data:
    raise ValueError(f'{tokenizer!r}.split_bytes did not give back its input; '
                     'the byte-pool model needs exact boundaries.')
  out = []
  for piece in pieces:
    out.extend(piece[i:i + max_bytes] for i in range(0, len(piece), max_bytes))
  return out


def chunks_to_bytes(ids_NxC: np.ndarray) -> bytes:
  """Inverse of `encode_chunks` for text rows: the bytes of every row, joined."""
  ids = np.asarray(ids_NxC).reshape(-1)
  return (ids[ids >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tobytes()


def encode_chunks(chunks: list[bytes], width: int, *, end_of_chunk: bool):
  """Rows of byte ids [N, width] (+ END_OF_CHUNK after the bytes if asked) and lengths [N]."""
  n = len(chunks)
  lengths = np.fromiter((len(c) for c in chunks), np.int32, count=n)
  if n and lengths.max() + int(end_of_chunk) > width:
    raise ValueError(f'a chunk of {lengths.max()} bytes does not fit a row of {width} slots')
  ids = np.zeros((n, width), np.int32)
  if n:
    flat = np.frombuffer(b''.join(chunks), np.uint8).astype(np.int32) + BYTE_OFFSET
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids[rows, cols] = flat
    if end_of_chunk:
      ids[np.arange(n), lengths] = END_OF_CHUNK
  return ids, lengths


def decode_chunk_ids(ids) -> tuple[bytes, bool]:
  """Bytes of one target-style row up to its end; also whether the row was EOT."""
  out = []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i == EOT:
      return bytes(out), True
    if i in (END_OF_CHUNK, PAD):
      break
    out.append(i - BYTE_OFFSET)
  return bytes(out), False


class ChunkFeaturizer:
  """Byte-pool featurizer: one chunk per position; the interface of `TokenFeaturizer`.

  A document is `[eot] + chunks + [eot]` (mirroring the baseline's `[eot] + tokens + [eot]`),
  so both models predict the same text bytes plus one end-of-text.
  """

  def __init__(self, tokenizer, max_len: int, max_bytes_per_chunk: int = 16):
    if max_len < 1:
      raise ValueError(f'model.max_len must be >= 1, got {max_len}')
    if max_bytes_per_chunk < 1:
      raise ValueError('model.byte_pool.max_bytes_per_chunk must be >= 1, '
                       f'got {max_bytes_per_chunk}')
    self.tokenizer = tokenizer
    self.max_len = int(max_len)
    self.max_bytes = int(max_bytes_per_chunk)
    self.width = chunk_width(self.max_bytes)

  def chunks(self, text: str | bytes) -> list[bytes]:
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return chunk_bytes(data, self.tokenizer, self.max_bytes)

  def sequence(self, chunks: list[bytes], *, eot_start: bool = True, eot_end: bool = False):
    """(input rows, target rows, byte lengths) of a chunk sequence, EOT chunks added."""
    in_ids, lengths = encode_chunks(chunks, self.width, end_of_chunk=False)
    tgt_ids, _ = encode_chunks(chunks, self.width, end_of_chunk=True)
    eot_row = np.zeros((1, self.width), np.int32)
    eot_row[0, 0] = EOT
    zero = np.zeros((1,), np.int32)
    parts_in, parts_tgt, parts_len = [in_ids], [tgt_ids], [lengths]
    if eot_start:
      parts_in.insert(0, eot_row), parts_tgt.insert(0, eot_row), parts_len.insert(0, zero)
    if eot_end:
      parts_in.append(eot_row), parts_tgt.append(eot_row), parts_len.append(zero)
    return (np.concatenate(parts_in), np.concatenate(parts_tgt),
            np.concatenate(parts_len).astype(np.int32))

  @staticmethod
  def _example(in_ids, tgt_ids, lengths, s, e) -> dict[str, np.ndarray]:
    """Positions s..e-1 of the sequence as inputs, s+1..e as targets."""
    return {
        'inputs': in_ids[s:e - 1],
        'targets': tgt_ids[s + 1:e],
        'loss_mask': np.ones((e - 1 - s,), np.float32),
        'target_bytes': lengths[s + 1:e],
    }

  def document(self, text: str) -> list[dict[str, np.ndarray]]:
    """Windows of <= max_len targets over `[eot] + chunks + [eot]`, sharing one chunk.

    Window k holds targets k*L+1 .. (k+1)*L, so every target appears exactly once.
    A document with no bytes gives no examples (as the baseline's with no tokens).
    """
    chunks = self.chunks(text)
    if not chunks:
      return []
    in_ids, tgt_ids, lengths = self.sequence(chunks, eot_start=True, eot_end=True)
    n_targets = len(in_ids) - 1
    return [self._example(in_ids, tgt_ids, lengths, s, min(s + self.max_len + 1, n_targets + 1))
            for s in range(0, n_targets, self.max_len)]

  def conversation(self, pieces: list[tuple[str, bool]]) -> list[dict[str, np.ndarray]]:
    """Windows (as `document`) over `[eot] + chunks(piece_1) + ... + [eot]`, each piece
    chunked on its own, so every chunk is wholly prompt or wholly response and a masked
    chunk's likelihood is exactly its bytes'. loss_mask is 1 only on chunks of flagged
    pieces (the closing end-of-text takes the last piece's flag); windows with no flagged
    target are dropped."""
    chunks, flag_N = conversation_chunks(self.chunks, pieces)
    if not chunks:
      return []
    in_ids, tgt_ids, lengths = self.sequence(chunks, eot_start=True, eot_end=True)
    n_targets = len(in_ids) - 1
    out = []
    for s in range(0, n_targets, self.max_len):
      e = min(s + self.max_len + 1, n_targets + 1)
      example = self._example(in_ids, tgt_ids, lengths, s, e)
      example['loss_mask'] = flag_N[s + 1:e]
      if example['loss_mask'].any():
        out.append(example)
    return out

  def pair(self, context: str, continuation: str, *, always_prefix_eot: bool = False
           ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`chunks(context) + chunks(continuation)`, chunked separately.

    Trailing whitespace of the context moves to the continuation (the baseline's
    lm-eval-harness convention); the end-of-text chunk is prepended only when the context
    is empty, or always with `always_prefix_eot`. Returns the example and a bool mask of
    continuation targets.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx, cont = self.chunks(context), self.chunks(continuation)
    prefix = 1 if always_prefix_eot or not ctx else 0
    in_ids, tgt_ids, lengths = self.sequence(ctx + cont, eot_start=bool(prefix))
    example = self._example(in_ids, tgt_ids, lengths, 0, len(in_ids))
    mask = np.zeros(len(in_ids) - 1, bool)
    mask[prefix + len(ctx) - 1:] = True
    return example, mask


def make_chunk_featurizer(config, tokenizer) -> ChunkFeaturizer:
  """The slot-row featurizer of the paper byte-pool model, from its config."""
  return ChunkFeaturizer(tokenizer, config.model.max_len,
                         config.model.byte_pool.max_bytes_per_chunk)


def conversation_chunks(chunk_fn, pieces: list[tuple[str, bool]]):
  """(chunks of every piece, each piece chunked on its own; the loss flag of each position
  of [eot] + chunks + [eot]: 0 for the opening end-of-text, the piece's flag for its chunks,
  the last piece's for the closing end-of-text)."""
  chunks, flags = [], [0.0]
  for text, flag in pieces:
    part = chunk_fn(text)
    chunks += part
    flags += [float(flag)] * len(part)
  return chunks, np.asarray(flags + [float(pieces[-1][1])], np.float32)
