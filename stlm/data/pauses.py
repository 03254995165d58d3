"""Pause tokens (Goyal et al. 2023) on the data side: where pauses go, and exact accounting.

A pause inserted after position i (input x_i, target y_i) delays y_i: position i keeps its
input but predicts nothing, then `count` pause positions follow, the last of which predicts
y_i (with y_i's loss_mask and target_bytes); the other pauses predict nothing. So every real
target is predicted exactly once, and sum(loss_mask), sum(target_bytes * loss_mask) and the
model's units (counted under loss_mask) are those of the example without pauses: loss,
bits per byte and `units` stay comparable with a run without pauses.

`PauseFeaturizer` wraps any featurizer (tokens or chunks): `model.pause_every = k` inserts
`model.pause_count` pauses after every k-th position (training and scoring alike), and
`model.pause_before_continuation = m` inserts m pauses between a scoring pair's context and
its continuation (so the first continuation target is predicted after m pauses).
A pause's input is `stlm.ids.PAUSE_ID` (first slot of a chunk row); the model swaps
in its learned pause vector (stlm/models/pause.py).
"""

from __future__ import annotations

import numpy as np

from stlm.ids import PAUSE_ID


def pause_input(unit):
  """The input of a pause position shaped like one input unit (token id or chunk row)."""
  row = np.zeros_like(unit)
  row.reshape(-1)[:1] = PAUSE_ID
  return row


def insert_pauses(example: dict[str, np.ndarray], counts: dict[int, int],
                  mask: np.ndarray | None = None):
  """(example, mask) with counts[i] pauses after position i (see the module docstring).

  `mask` (bool per target, e.g. the continuation of a scoring pair) moves with its target:
  the delayed target's position carries it, positions that predict nothing are False.
  """
  n = len(example['targets'])
  if not counts:
    return example, mask
  rows = {k: [] for k in example}
  out_mask = []
  blank = {k: np.zeros_like(v[0]) for k, v in example.items()}
  for i in range(n):
    m = int(counts.get(i, 0))
    if m <= 0:
      for k, v in example.items():
        rows[k].append(v[i])
      out_mask.append(bool(mask[i]) if mask is not None else False)
      continue
    # Position i: its input stays, its prediction moves to the last pause.
    for k, v in example.items():
      rows[k].append(v[i] if k == 'inputs' else blank[k])
    out_mask.append(False)
    for j in range(m):
      last = j == m - 1
      for k, v in example.items():
        if k == 'inputs':
          rows[k].append(pause_input(v[i]))
        else:
          rows[k].append(v[i] if last else blank[k])
      out_mask.append(bool(mask[i]) if (last and mask is not None) else False)
  new = {k: np.stack(v).astype(example[k].dtype) for k, v in rows.items()}
  return new, (np.asarray(out_mask, bool) if mask is not None else None)


class PauseFeaturizer:
  """Wraps a featurizer: same interface, pauses inserted, accounting unchanged."""

  def __init__(self, inner, *, every: int, count: int, before_continuation: int):
    if every < 0 or count < 1 or before_continuation < 0:
      raise ValueError(f'pauses need model.pause_every >= 0 (got {every}), model.pause_count '
                       f'>= 1 (got {count}), model.pause_before_continuation >= 0 (got '
                       f'{before_continuation})')
    self.inner = inner
    self.max_len = inner.max_len
    self.every, self.count, self.before_continuation = int(every), int(count), int(before_continuation)

  def __getattr__(self, name):  # e.g. byte_lengths of the wrapped featurizer
    if name == 'inner' or name.startswith('__'):  # unpickling (grain workers): no recursion
      raise AttributeError(name)
    return getattr(self.inner, name)

  def _every_k(self, n: int) -> dict[int, int]:
    if not self.every:
      return {}
    return {i: self.count for i in range(self.every - 1, n, self.every)}

  def document(self, text: str) -> list[dict[str, np.ndarray]]:
    windows = self.inner.document(text)
    if not windows or not self.every:
      return windows
    # The inner windows tile the document's positions; pauses go in over the whole document,
    # then it is cut again into windows of max_len positions.
    full = {k: np.concatenate([w[k] for w in windows]) for k in windows[0]}
    full, _ = insert_pauses(full, self._every_k(len(full['targets'])))
    n, L = len(full['targets']), self.max_len
    return [{k: v[s:s + L] for k, v in full.items()} for s in range(0, n, L)]

  def pair(self, context: str, continuation: str, *, always_prefix_eot: bool = False):
    example, mask = self.inner.pair(context, continuation, always_prefix_eot=always_prefix_eot)
    counts = self._every_k(len(mask))
    idx = np.flatnonzero(mask)
    if self.before_continuation and idx.size:
      # The first continuation target is predicted after these pauses (plus any every-k ones).
      first = int(idx[0])
      counts[first] = counts.get(first, 0) + self.before_continuation
    return insert_pauses(example, counts, mask)


def maybe_wrap(config, featurizer):
  """`featurizer`, wrapped in a PauseFeaturizer when config.model asks for pauses."""
  m = config.model
  every = int(m.pause_every)
  before = int(m.pause_before_continuation)
  if not every and not before:
    return featurizer
  return PauseFeaturizer(featurizer, every=every, count=int(m.pause_count),
                         before_continuation=before)
