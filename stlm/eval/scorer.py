"""Jitted log-likelihood scorer for any model kind (baseline tokens or byte-pool chunks).

Requests become *spans*: a window [lo, hi) of one featurized example plus a mask of the
targets to sum. Spans are padded to a few fixed lengths (powers of two up to the window),
batched to a fixed batch size and run through one jitted forward per length, so the number
of compilations is bounded by the number of buckets, never by the number of items. Sums are
taken on the host in float64, so a result does not depend on the padding or batch mates.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

_PIPELINE_DEPTH = 2  # batches in flight before the oldest is fetched (async dispatch)


@dataclasses.dataclass(frozen=True)
class Result:
  """Score of one continuation (or one whole document for the rolling variant)."""
  logprob: float   # summed natural-log probability of the continuation's targets
  is_greedy: bool  # every continuation target is the model's argmax
  tokens: int      # targets scored: tokens (baseline) or chunks (byte-pool)
  bytes: int       # UTF-8 bytes of the continuation text
  chars: int       # characters of the continuation text


@dataclasses.dataclass
class _Span:
  example: dict        # full example arrays, leading axis = positions
  lo: int
  hi: int
  mask: np.ndarray     # bool [hi - lo]: targets of the window to sum
  owner: int           # request index the span belongs to


def bucket_lengths(max_len: int, min_bucket: int = 16) -> tuple[int, ...]:
  """Powers of two from `min_bucket` below `max_len`, then `max_len` itself."""
  out, b = [], max(1, int(min_bucket))
  while b < max_len:
    out.append(b)
    b *= 2
  return tuple(out) + (int(max_len),)


def cover(n: int, start: int, window: int, stride: int | None = None):
  """Windows [lo, hi) and scored target ranges [a, b) covering targets start..n-1.

  Pieces of `stride` targets (default: the window) are scored in windows that end at the
  piece's end and reach back as far as the window allows (context cut from the left), so
  every target is scored exactly once with as much context as fits.
  """
  stride = window if stride is None else int(stride)
  if not 1 <= stride <= window:
    raise ValueError(f'stride must be in 1..{window} (the window), got {stride}')
  out = []
  for a in range(start, n, stride):
    b = min(a + stride, n)
    out.append((max(0, b - window), b, a, b))
  return out


class Scorer:
  """Scores (context, continuation) pairs and whole documents with a model and featurizer."""

  def __init__(self, model, params, featurizer, *, max_len: int | None = None,
               batch_size: int = 32, min_bucket: int = 16, progress: bool = False,
               verbose: bool = False, always_prefix_eot: bool = False):
    self.model = model
    # False: end-of-text only before an empty context, as lm-eval-harness; True: before
    # every context (this repo's convention before the harness adapter existed).
    self.always_prefix_eot = bool(always_prefix_eot)
    self.params = nn.unbox(params)
    self.featurizer = featurizer
    self.max_len = int(max_len or featurizer.max_len)
    self.batch_size = int(batch_size)
    self.buckets = bucket_lengths(self.max_len, min_bucket)
    self.progress = progress
    self.verbose = verbose
    self.compile_count = 0  # bumped inside the traced body, so it counts traces only
    self.stats: dict = {}
    self._forward = jax.jit(self._forward_fn)

  # ---------------------------------------------------------------- device side

  def _forward_fn(self, params, batch, mask_BxT):
    self.compile_count += 1
    out = self.model.apply({'params': params}, batch, deterministic=True)
    # where, not multiply: a fully padded row may hold NaN, which must not leak into sums.
    logprobs_BxT = jnp.where(mask_BxT, out['logprobs'].astype(jnp.float32), 0.0)
    greedy_B = jnp.all(jnp.where(mask_BxT, out['greedy'], True), axis=-1)
    # The model's own statistics (e.g. layers used per token under early exit), summed over
    # every real position of the batch (context included: those positions ran too).
    stats = dict(out.get('stats', {}), positions=jnp.sum(batch['loss_mask']))
    return logprobs_BxT, greedy_B, stats

  # ---------------------------------------------------------------- host side

  def _bucket(self, length: int) -> int:
    for b in self.buckets:
      if length <= b:
        return b
    raise AssertionError(f'span of {length} positions exceeds the window {self.max_len}')

  def _batch(self, spans: Sequence[_Span], T: int):
    B = self.batch_size
    if hasattr(self.featurizer, 'batch_spans'):  # a layout of its own (byte-pool v2 streams)
      batch = self.featurizer.batch_spans([(s.example, s.lo, s.hi) for s in spans], B, T)
      mask = np.zeros((B, T), bool)
      for r, s in enumerate(spans):
        mask[r, :s.hi - s.lo] = s.mask
      return batch, mask & (batch['loss_mask'] > 0)
    first = spans[0].example
    batch = {k: np.zeros((B, T) + v.shape[1:], v.dtype) for k, v in first.items()}
    batch['segment_ids'] = np.zeros((B, T), np.int32)
    batch['positions'] = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), bool)
    for r, s in enumerate(spans):
      n = s.hi - s.lo
      for k, v in s.example.items():
        batch[k][r, :n] = v[s.lo:s.hi]
      batch['segment_ids'][r, :n] = 1
      batch['positions'][r, :n] = np.arange(n)
      mask[r, :n] = s.mask
    if 'loss_mask' in batch:
      mask &= batch['loss_mask'] > 0
    return batch, mask

  def score_spans(self, spans: Sequence[_Span], n_owners: int, desc: str = 'scoring'):
    """(float64 logprob sums, greedy flags, target counts) per owner."""
    logprob = np.zeros(n_owners, np.float64)
    greedy = np.ones(n_owners, bool)
    count = np.zeros(n_owners, np.int64)
    by_bucket: dict[int, list[_Span]] = {}
    for s in spans:
      by_bucket.setdefault(self._bucket(s.hi - s.lo), []).append(s)
    jobs = [(T, group[i:i + self.batch_size]) for T, group in sorted(by_bucket.items())
            for i in range(0, len(group), self.batch_size)]
    compiles0, t0 = self.compile_count, time.perf_counter()
    bar = tqdm.tqdm(total=len(spans), desc=desc, unit='item', disable=not self.progress,
                    file=sys.stderr, leave=False)
    in_flight = []
    model_stats: dict = {}

    def collect():
      chunk, (lp_dev, greedy_dev, stats_dev) = in_flight.pop(0)
      for k, v in stats_dev.items():
        model_stats[k] = model_stats.get(k, 0.0) + float(v)
      lp, gr = np.asarray(lp_dev, np.float64), np.asarray(greedy_dev)
      for r, s in enumerate(chunk):
        logprob[s.owner] += lp[r].sum()
        greedy[s.owner] &= bool(gr[r])
        count[s.owner] += int(s.mask.sum())
      bar.update(len(chunk))

    for T, chunk in jobs:
      batch, mask = self._batch(chunk, T)
      in_flight.append((chunk, self._forward(self.params, batch, mask)))
      if len(in_flight) > _PIPELINE_DEPTH:
        collect()
    while in_flight:
      collect()
    bar.close()
    seconds = time.perf_counter() - t0
    self.stats = dict(items=len(spans), batches=len(jobs), seconds=seconds,
                      items_per_s=len(spans) / max(seconds, 1e-9),
                      compiles=self.compile_count - compiles0,
                      compile_count=self.compile_count)
    positions = model_stats.pop('positions', 0.0)
    if model_stats:  # per real position, e.g. layers_used = average layers per token
      self.stats['model_stats'] = {k: v / max(positions, 1.0) for k, v in model_stats.items()}
    if self.verbose:
      print(f'[scorer] {desc}: {len(spans)} spans in {len(jobs)} batches, {seconds:.2f}s, '
            f'{self.stats["items_per_s"]:.1f} items/s, {self.stats["compiles"]} new '
            f'compilations ({self.compile_count} in all)', file=sys.stderr)
    return logprob, greedy, count

  # ---------------------------------------------------------------- public API

  def loglikelihood(self, requests: Iterable[tuple[str, str]],
                    desc: str = 'loglikelihood') -> list[Result]:
    """log p(continuation | context) per pair; contexts too long are cut from the left."""
    requests = list(requests)
    spans = []
    for i, (context, continuation) in enumerate(requests):
      example, mask = self.featurizer.pair(context, continuation,
                                           always_prefix_eot=self.always_prefix_eot)
      idx = np.flatnonzero(mask)
      start = int(idx[0]) if idx.size else len(mask)
      # A continuation longer than the window is scored piecewise (rolling), not dropped.
      for lo, hi, a, b in cover(len(mask), start, self.max_len):
        spans.append(_Span(example, lo, hi, mask[lo:hi] & (np.arange(lo, hi) >= a), i))
    lp, gr, n = self.score_spans(spans, len(requests), desc)
    return [Result(float(lp[i]), bool(gr[i]), int(n[i]), len(c.encode('utf-8')), len(c))
            for i, (_, c) in enumerate(requests)]

  def document_spans(self, text: str, owner: int, stride: int | None = None) -> list[_Span]:
    """Spans scoring every target of `featurizer.document(text)` exactly once."""
    windows = self.featurizer.document(text)
    if not windows:
      return []
    # Consecutive windows share one position, so concatenating them rebuilds the whole
    # document's per-position arrays (inputs[t + 1] is targets[t]).
    full = {k: np.concatenate([w[k] for w in windows]) for k in windows[0]}
    n = len(full['loss_mask'])  # targets per position (stream layouts have more symbols)
    # Positions that predict nothing (loss_mask 0, e.g. before a pause) are not targets.
    real = full['loss_mask'] > 0
    return [_Span(full, lo, hi, (np.arange(lo, hi) >= a) & real[lo:hi], owner)
            for lo, hi, a, _ in cover(n, 0, self.max_len, stride)]

  def loglikelihood_rolling(self, texts: Iterable[str], stride: int | None = None,
                            desc: str = 'rolling') -> list[Result]:
    """log p(document) per text: every target (incl. the closing end-of-text) once.

    stride=None scores the featurizer's non-overlapping windows; a smaller stride slides
    the window so each target (after the first window) sees window - stride context.
    """
    texts = list(texts)
    spans = [s for i, t in enumerate(texts) for s in self.document_spans(t, i, stride)]
    lp, gr, n = self.score_spans(spans, len(texts), desc)
    return [Result(float(lp[i]), bool(gr[i]), int(n[i]), len(t.encode('utf-8')), len(t))
            for i, t in enumerate(texts)]
