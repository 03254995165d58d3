"""Featurizers: text -> model examples (see docs/architecture.md, "Data").

An example is a dict of numpy arrays with leading axis = sequence length:
`inputs`, `targets` (int32), `loss_mask` (float32, 1 on real targets) and `target_bytes`
(int32, UTF-8 bytes of each target, 0 for end-of-text). The packer in `pipeline.py` adds
`segment_ids` and `positions` when it puts examples into rows.
"""

from __future__ import annotations

import numpy as np

from stlm.tokenizers import Tokenizer


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
  """int32 [vocab]: UTF-8 bytes each token id stands for (0 for specials)."""
  return np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)],
                  np.int32)


class TokenFeaturizer:
  """Baseline featurizer: one token per position."""

  def __init__(self, tokenizer: Tokenizer, max_len: int):
    if max_len < 1:
      raise ValueError(f'model.max_len must be >= 1, got {max_len}')
    self.tokenizer = tokenizer
    self.max_len = int(max_len)
    self._nbytes = None

  @property
  def byte_lengths(self) -> np.ndarray:
    """int32 [vocab]: bytes each token stands for (0 for specials); built on first use."""
    if self._nbytes is None:
      self._nbytes = token_byte_lengths(self.tokenizer)
    return self._nbytes

  def _example(self, seq: np.ndarray) -> dict[str, np.ndarray]:
    targets = seq[1:]
    return {
        'inputs': seq[:-1],
        'targets': targets,
        'loss_mask': np.ones(targets.shape, np.float32),
        'target_bytes': self.byte_lengths[targets],
    }

  def document(self, text: str) -> list[dict[str, np.ndarray]]:
    """Windows over `[eot] + tokens + [eot]` of <= max_len targets, sharing one token.

    Window k holds targets k*L+1 .. (k+1)*L of the document, so every target appears
    exactly once. A document with no tokens gives no examples.
    """
    ids = self.tokenizer.encode(text)
    if not ids:
      return []
    eot = self.tokenizer.eot_id
    doc = np.asarray([eot] + ids + [eot], np.int32)
    n_targets = len(doc) - 1
    return [self._example(doc[s:s + self.max_len + 1])
            for s in range(0, n_targets, self.max_len)]

  def conversation(self, pieces: list[tuple[str, bool]]) -> list[dict[str, np.ndarray]]:
    """Windows (as `document`) over `[eot] + enc(piece_1) + ... + [eot]`, each piece encoded
    on its own; loss_mask is 1 only on targets inside a flagged piece (the closing
    end-of-text takes the last piece's flag). Windows with no flagged target are dropped.
    """
    eot = self.tokenizer.eot_id
    ids, flags = [eot], [0.0]
    for text, flag in pieces:
      enc = self.tokenizer.encode(text)
      ids += enc
      flags += [float(flag)] * len(enc)
    if len(ids) == 1:
      return []
    ids.append(eot)
    flags.append(float(pieces[-1][1]))
    doc, flag_N = np.asarray(ids, np.int32), np.asarray(flags, np.float32)
    out = []
    for s in range(0, len(doc) - 1, self.max_len):
      example = self._example(doc[s:s + self.max_len + 1])
      example['loss_mask'] = flag_N[s + 1:s + self.max_len + 1]
      if example['loss_mask'].any():
        out.append(example)
    return out

  def pair(self, context: str, continuation: str, *, always_prefix_eot: bool = False
           ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`enc(context) + enc(continuation)`, encoded separately, as lm-eval-harness scores.

    Trailing whitespace of the context moves to the continuation (harness convention, so
    ' word' stays one token). End-of-text is prepended only when the context is empty (the
    harness's prefix token), or always with `always_prefix_eot` (this repo's old default).
    Returns the example and a bool mask of continuation targets.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = self.tokenizer.encode(context)
    cont = self.tokenizer.encode(continuation)
    prefix = [self.tokenizer.eot_id] if always_prefix_eot or not ctx else []
    seq = np.asarray(prefix + ctx + cont, np.int32)
    example = self._example(seq)
    mask = np.zeros(len(seq) - 1, bool)
    mask[len(prefix) + len(ctx) - 1:] = True  # targets from there on are the continuation's
    return example, mask
