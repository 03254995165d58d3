"""Row layout of the scorer: which spans share a row, which length bucket, how many targets.

A span is `length` positions of one request with `targets` of them scored. Rows are
`max_len` long; with packing, spans are placed back to back (best fit, longest first), so
BLiMP's short sentences fill rows instead of padding them. A finished row is then run at
the smallest bucket length that holds both its positions and its targets, so the compiled
shapes are one per bucket: B rows x T positions x K(T) scored positions.

K(T) = ceil(fraction * T) is the gathered output-layer budget of bucket T, fixed per scorer
so the compiled shapes never depend on the requests. A span with more targets than the
largest bucket's budget (a rolling window, a long continuation) is scored as several
pieces: the same window, each piece summing a disjoint part of its targets (`split`), so
every target still sees exactly its unpacked context. A row whose targets exceed a bucket's
budget simply runs at a larger bucket.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DEFAULT_FRACTION = 0.5  # K(T) / T: half of a row's positions reach the output layer


def budget(T: int, fraction: float) -> int:
  """K(T): scored positions per row in bucket T."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'score fraction must be in (0, 1], got {fraction!r}')
  return max(1, min(T, math.ceil(fraction * T)))


def split(mask: np.ndarray, k: int) -> list[np.ndarray]:
  """Masks partitioning `mask`'s True entries into runs of at most k (in order)."""
  idx = np.flatnonzero(mask)
  out = []
  for a in range(0, len(idx), k):
    m = np.zeros_like(mask)
    m[idx[a:a + k]] = True
    out.append(m)
  return out


def pick_bucket(buckets: Sequence[int], length: int, targets: int,
                fraction: float | None) -> int:
  """Smallest bucket holding `length` positions and (fraction given) `targets` targets."""
  for b in buckets:
    if length <= b and (fraction is None or targets <= budget(b, fraction)):
      return b
  raise ValueError(f'a span of {length} positions / {targets} targets fits no bucket '
                   f'{tuple(buckets)} (fraction {fraction})')


def pack(lengths: Sequence[int], targets: Sequence[int], max_len: int,
         max_targets: int) -> list[list[int]]:
  """Span indices per row: best fit, longest first, within both capacities.

  Every row holds at most `max_len` positions and `max_targets` targets. A span goes to the
  open row it fits that has the least slack left (free positions / max_len + free targets /
  max_targets, so whichever capacity binds is filled), else to a new row.
  """
  for n, k in zip(lengths, targets):
    if n > max_len or k > max_targets:
      raise ValueError(f'a span of {n} positions / {k} targets exceeds a row '
                       f'({max_len} / {max_targets})')
  rows: list[list[int]] = []
  free_len = np.zeros(len(lengths), np.int64)  # per row; at most one row per span
  free_tg = np.zeros(len(lengths), np.int64)
  # Order by (length, targets) only: the same multiset of spans in any order gives rows of
  # the same shapes, so re-scoring reordered requests never compiles a new bucket.
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], -targets[i], i)):
    n, k = lengths[i], targets[i]
    m = len(rows)
    fits = np.flatnonzero((free_len[:m] >= n) & (free_tg[:m] >= k))
    if fits.size:
      slack = free_len[fits] / max_len + free_tg[fits] / max_targets
      r = int(fits[np.argmin(slack)])
      rows[r].append(i)
    else:
      r = m
      rows.append([i])
      free_len[r], free_tg[r] = max_len, max_targets
    free_len[r] -= n
    free_tg[r] -= k
  return rows


def batches(rows_by_bucket: dict, batch_size: int) -> list[tuple[int, list]]:
  """(T, rows) batches of at most batch_size rows, largest buckets first.

  The last batch of a bucket is topped up with rows of smaller buckets (a row fits any
  larger bucket): those slots would run as padding anyway, and a small bucket whose rows
  all move up costs no batch (and no compilation) at all.
  """
  groups = {T: list(rows) for T, rows in rows_by_bucket.items() if rows}
  order = sorted(groups, reverse=True)
  out = []
  for a, T in enumerate(order):
    group = groups[T]
    free = (-len(group)) % batch_size
    for smaller in order[a + 1:]:
      while free and groups[smaller]:
        group.append(groups[smaller].pop())
        free -= 1
    out += [(T, group[i:i + batch_size]) for i in range(0, len(group), batch_size)]
  return out
