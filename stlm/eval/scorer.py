"""Jitted log-likelihood scorer for any model kind (baseline tokens or byte-pool chunks).

Requests become *spans*: a window [lo, hi) of one featurized example plus a mask of the
targets to sum. Spans are laid out in rows of a few fixed lengths (powers of two up to the
window), batched to a fixed number of rows and run through one jitted forward per length,
so the number of compilations is bounded by the number of buckets, never by the number of
items. Sums are taken on the host in float64, so a result does not depend on the padding or
row mates beyond float32 rounding.

Two fast paths, each used when the model's kind declares it (`kinds.Scoring`):
  pack: short spans share a row (one segment id each, positions restarting at 0), placed
    by stlm/eval/packing.py, so BLiMP's short sentences fill rows instead of padding;
  gather: the model runs its output layer only at the K(T) scored positions of a row
    (`batch['score_idx']`), not at all T.
Other kinds (byte_pool) keep one span per row and the full forward.
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

from stlm.eval import packing
from stlm.models import kinds

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


def _support(model) -> kinds.Scoring:
  """The fast paths of the model's kind (a model without a `cfg.kind` gets none)."""
  kind = getattr(getattr(model, 'cfg', None), 'kind', None)
  return kinds.get_kind(kind).scoring(model.cfg) if kind else kinds.Scoring()


def _resolve(name: str, asked: bool | None, supported: bool) -> bool:
  if asked and not supported:
    raise ValueError(f'Scorer({name}=True): this model kind does not support it '
                     f'(kinds.Scoring.{name} is False)')
  return supported if asked is None else bool(asked)


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
  """Scores (context, continuation) pairs and whole documents with a model and featurizer.

  pack / gather: None uses what the model's kind supports (`kinds.Scoring`); False turns a
  fast path off (False, False is the plain path: one span per row, output layer at every
  position). score_fraction: K(T) / T, the output-layer positions per row of bucket T
  (see stlm/eval/packing.py; 1.0 suits requests that are all targets, like BLiMP's); fixed
  per scorer, so the compiled shapes never depend on the requests.
  """

  def __init__(self, model, params, featurizer, *, max_len: int | None = None,
               batch_size: int = 32, min_bucket: int = 16, progress: bool = False,
               verbose: bool = False, always_prefix_eot: bool = False,
               pack: bool | None = None, gather: bool | None = None,
               score_fraction: float | None = None):
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
    support = _support(model)
    if hasattr(featurizer, 'batch_spans'):  # a row layout of its own: one span per row
      support = kinds.Scoring()
    self.pack = _resolve('pack', pack, support.pack)
    self.gather = _resolve('gather', gather, support.gather)
    self.score_fraction = float(packing.DEFAULT_FRACTION if score_fraction is None
                                else score_fraction)
    packing.budget(1, self.score_fraction)  # checks the value once, here
    self.compile_count = 0  # bumped inside the traced body, so it counts traces only
    self.compiles_by_shape: dict = {}  # (T, K or None) -> traces of that bucket's shape
    self.stats: dict = {}
    self._forward = jax.jit(self._forward_fn)

  # ---------------------------------------------------------------- device side

  def _forward_fn(self, params, batch, valid):
    """Per scored slot (B x T, or B x K with `score_idx`): log p, greedy; model stats."""
    self.compile_count += 1
    shape = (batch['loss_mask'].shape[1], batch['score_idx'].shape[1] if 'score_idx' in batch
             else None)
    self.compiles_by_shape[shape] = self.compiles_by_shape.get(shape, 0) + 1
    out = self.model.apply({'params': params}, batch, deterministic=True)
    # where, not multiply: a fully padded row may hold NaN, which must not leak into sums.
    logprobs = jnp.where(valid, out['logprobs'].astype(jnp.float32), 0.0)
    greedy = jnp.where(valid, out['greedy'], True)
    # The model's own statistics (e.g. layers used per token under early exit), summed over
    # every real position of the batch (context included: those positions ran too).
    stats = dict(out.get('stats', {}), positions=jnp.sum(batch['loss_mask']))
    return logprobs, greedy, stats

  # ---------------------------------------------------------------- host side

  def _rows(self, spans: Sequence[_Span]):
    """(pieces, {bucket T: [rows of piece indices]}).

    Pieces are the spans with at least one target; under `gather`, a span with more targets
    than the largest bucket's K is cut into pieces of the same window (packing.split).
    """
    k_max = self._k(self.max_len) or self.max_len
    pieces = []
    for s in spans:
      pieces += [dataclasses.replace(s, mask=m) for m in packing.split(s.mask, k_max)]
    lengths = [s.hi - s.lo for s in pieces]
    targets = [int(s.mask.sum()) for s in pieces]
    if self.pack:
      rows = packing.pack(lengths, targets, self.max_len, k_max)
    else:
      rows = [[i] for i in range(len(pieces))]
    fraction = self.score_fraction if self.gather else None
    by_bucket = {}
    for row in rows:
      n, k = sum(lengths[i] for i in row), sum(targets[i] for i in row)
      by_bucket.setdefault(packing.pick_bucket(self.buckets, n, k, fraction), []).append(row)
    return pieces, by_bucket

  def _k(self, T: int) -> int | None:
    """Gathered positions per row of bucket T (None: the full head)."""
    return packing.budget(T, self.score_fraction) if self.gather else None

  def layout(self, spans: Sequence[_Span]):
    """(pieces, jobs): the pieces scored and, per batch in run order, (T, K, rows of piece
    indices); `make_batch(pieces, rows, T, K)` builds each batch. What `score_spans` runs,
    for callers that compute other quantities on exactly the scorer's rows."""
    pieces, rows = self._rows(spans)
    batches = packing.batches(rows, self.batch_size)
    return pieces, [(T, self._k(T), chunk) for T, chunk in batches]

  def make_batch(self, spans: Sequence[_Span], rows: Sequence[Sequence[int]], T: int, K):
    """(batch, valid mask, owner per scored slot, -1 = none) for rows of span indices."""
    B = self.batch_size
    if hasattr(self.featurizer, 'batch_spans'):  # a layout of its own (byte-pool v2 streams)
      row_spans = [spans[row[0]] for row in rows]
      batch = self.featurizer.batch_spans([(s.example, s.lo, s.hi) for s in row_spans], B, T)
      owner = np.full((B, T), -1, np.int64)
      for r, s in enumerate(row_spans):
        owner[r, :s.hi - s.lo][s.mask] = s.owner
      owner[batch['loss_mask'] <= 0] = -1
      return batch, owner >= 0, owner
    first = spans[rows[0][0]].example
    batch = {k: np.zeros((B, T) + v.shape[1:], v.dtype) for k, v in first.items()}
    batch['segment_ids'] = np.zeros((B, T), np.int32)
    batch['positions'] = np.zeros((B, T), np.int32)
    owner_BxT = np.full((B, T), -1, np.int64)
    for r, row in enumerate(rows):
      at = 0
      for seg, i in enumerate(row, start=1):  # one segment per span, positions from 0
        s = spans[i]
        n = s.hi - s.lo
        for k, v in s.example.items():
          batch[k][r, at:at + n] = v[s.lo:s.hi]
        batch['segment_ids'][r, at:at + n] = seg
        batch['positions'][r, at:at + n] = np.arange(n)
        owner_BxT[r, at:at + n][s.mask] = s.owner
        at += n
    if 'loss_mask' in batch:
      owner_BxT[batch['loss_mask'] <= 0] = -1
    if K is None:
      return batch, owner_BxT >= 0, owner_BxT
    # Gathered: the scored positions of each row, left-aligned in K slots.
    idx_BxK = np.zeros((B, K), np.int32)
    owner_BxK = np.full((B, K), -1, np.int64)
    for r in range(B):
      pos = np.flatnonzero(owner_BxT[r] >= 0)
      idx_BxK[r, :len(pos)] = pos
      owner_BxK[r, :len(pos)] = owner_BxT[r, pos]
    batch['score_idx'] = idx_BxK
    return batch, owner_BxK >= 0, owner_BxK

  def score_spans(self, spans: Sequence[_Span], n_owners: int, desc: str = 'scoring'):
    """(float64 logprob sums, greedy flags, target counts) per owner."""
    logprob = np.zeros(n_owners, np.float64)
    missed = np.zeros(n_owners, np.int64)  # scored targets that are not the argmax
    count = np.zeros(n_owners, np.int64)
    for s in spans:
      count[s.owner] += int(s.mask.sum())
    compiles0, t0 = self.compile_count, time.perf_counter()
    pieces, jobs = self.layout(spans)
    bar = tqdm.tqdm(total=len(pieces), desc=desc, unit='item', disable=not self.progress,
                    file=sys.stderr, leave=False)
    in_flight = []
    model_stats: dict = {}

    def collect():
      n_spans, owner, (lp_dev, greedy_dev, stats_dev) = in_flight.pop(0)
      for k, v in stats_dev.items():
        model_stats[k] = model_stats.get(k, 0.0) + float(v)
      keep = owner >= 0
      who = owner[keep]
      logprob[:] += np.bincount(who, np.asarray(lp_dev, np.float64)[keep], n_owners)
      missed[:] += np.bincount(who, ~np.asarray(greedy_dev)[keep], n_owners).astype(np.int64)
      bar.update(n_spans)

    for T, K, chunk in jobs:
      batch, valid, owner = self.make_batch(pieces, chunk, T, K)
      in_flight.append((sum(map(len, chunk)), owner, self._forward(self.params, batch, valid)))
      if len(in_flight) > _PIPELINE_DEPTH:
        collect()
    while in_flight:
      collect()
    bar.close()
    seconds = time.perf_counter() - t0
    self.stats = dict(items=len(spans), batches=len(jobs), seconds=seconds,
                      items_per_s=len(spans) / max(seconds, 1e-9),
                      compiles=self.compile_count - compiles0,
                      compile_count=self.compile_count,
                      rows=sum(len(chunk) for _, _, chunk in jobs), pieces=len(pieces),
                      positions_used=sum(s.hi - s.lo for s in pieces),
                      positions_run=sum(self.batch_size * T for T, _, _ in jobs),
                      buckets={T: K for T, K, _ in jobs})
    positions = model_stats.pop('positions', 0.0)
    if model_stats:  # per real position, e.g. layers_used = average layers per token
      self.stats['model_stats'] = {k: v / max(positions, 1.0) for k, v in model_stats.items()}
    if self.verbose:
      print(f'[scorer] {desc}: {len(spans)} spans in {self.stats["rows"]} rows, '
            f'{len(jobs)} batches, {seconds:.2f}s, {self.stats["items_per_s"]:.1f} items/s, '
            f'{self.stats["compiles"]} new compilations ({self.compile_count} in all)',
            file=sys.stderr)
    return logprob, missed == 0, count

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
