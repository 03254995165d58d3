"""Masked-language-model featurizer (BERT): text -> examples with corrupted inputs.

Each document becomes `[eot] + tokens + [eot]`, cut into windows of <= max_len tokens (no
shift: position t predicts its own token). In every window a fraction `mask_rate` of the
real tokens (never the [eot] boundaries) is chosen, at least one; a chosen input becomes
[MASK] with probability `mask_prob`, a uniformly random token with `random_prob`, and stays
itself otherwise (BERT: 0.15, 0.8, 0.1, keeping 0.1). `targets` are the original tokens and
`loss_mask` is 1 exactly on the chosen positions, so nothing else carries loss.

The choice is a deterministic function of (seed, window tokens, window index): the same
document is masked the same way every epoch ("static masking", as the original BERT data
with one duplicate), which keeps the data pipeline's exact resume intact.
"""

from __future__ import annotations

import zlib

import numpy as np

from stlm.data import featurize
from stlm.tokenizers import Tokenizer


def mask_id(tokenizer: Tokenizer) -> int:
  """[MASK]: one id past the tokenizer's vocabulary (the encoder has an extra embedding row)."""
  return int(tokenizer.vocab_size)


def make_mlm_featurizer(config, tokenizer: Tokenizer) -> 'MLMFeaturizer':
  m = config.model.mlm
  return MLMFeaturizer(tokenizer, config.model.max_len, mask_id=mask_id(tokenizer),
                       mask_rate=m.mask_rate, mask_prob=m.mask_prob, random_prob=m.random_prob,
                       seed=config.seed)


class MLMFeaturizer:
  """Featurizer of the encoder kind (same interface as featurize.TokenFeaturizer)."""

  def __init__(self, tokenizer: Tokenizer, max_len: int, *, mask_id: int, mask_rate=0.15,
               mask_prob=0.8, random_prob=0.1, seed: int = 0):
    if max_len < 2:
      raise ValueError(f'model.max_len must be >= 2 for masked-LM windows, got {max_len}')
    if not 0.0 < mask_rate <= 1.0:
      raise ValueError(f'model.mlm.mask_rate must be in (0, 1], got {mask_rate}')
    if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1.0:
      raise ValueError(f'model.mlm.mask_prob ({mask_prob}) + random_prob ({random_prob}) must '
                       'be non-negative and sum to <= 1 (the rest keeps the token)')
    self.tokenizer = tokenizer
    self.max_len = int(max_len)
    self.mask_id = int(mask_id)
    self.mask_rate, self.mask_prob, self.random_prob = mask_rate, mask_prob, random_prob
    self.seed = int(seed)
    self._nbytes = None

  @property
  def byte_lengths(self) -> np.ndarray:
    if self._nbytes is None:
      self._nbytes = featurize.token_byte_lengths(self.tokenizer)
    return self._nbytes

  def mask(self, seq: np.ndarray, rng: np.random.Generator,
           maskable: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The MLM example of one window `seq` (int32 [T]); `maskable` bool [T] (default all)."""
    seq = np.asarray(seq, np.int32)
    T = len(seq)
    maskable = np.ones(T, bool) if maskable is None else np.asarray(maskable, bool)
    candidates = np.flatnonzero(maskable)
    chosen = np.zeros(T, bool)
    if len(candidates):
      n = max(1, int(round(self.mask_rate * len(candidates))))
      chosen[rng.choice(candidates, size=n, replace=False)] = True
    u = rng.random(T)
    to_mask = chosen & (u < self.mask_prob)
    to_random = chosen & (u >= self.mask_prob) & (u < self.mask_prob + self.random_prob)
    inputs = seq.copy()
    inputs[to_mask] = self.mask_id
    inputs[to_random] = rng.integers(0, self.tokenizer.vocab_size, size=int(to_random.sum()))
    return {
        'inputs': inputs,
        'targets': seq,
        'loss_mask': chosen.astype(np.float32),
        'target_bytes': self.byte_lengths[seq],
    }

  def document(self, text: str) -> list[dict[str, np.ndarray]]:
    ids = self.tokenizer.encode(text)
    if not ids:
      return []
    eot = self.tokenizer.eot_id
    doc = np.asarray([eot] + ids + [eot], np.int32)
    out = []
    for k, s in enumerate(range(0, len(doc), self.max_len)):
      window = doc[s:s + self.max_len]
      if len(window) < 2:
        continue
      key = zlib.crc32(window.tobytes(), zlib.crc32(np.int64([self.seed, k]).tobytes()))
      out.append(self.mask(window, np.random.default_rng(key),
                           maskable=np.arange(s, s + len(window)) % (len(doc) - 1) != 0))
    return out
