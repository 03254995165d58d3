"""The statistics of the tiny-encoder study: gaps over seeds, slopes, and what they decide.

Every arm of the study is trained with several seeds, and seed s of the pretrained arm is
compared with seed s of the scratch arm (the same initialisation before pretraining, the
same fine-tuning seed, the same test items). Two standard errors are reported:
  seed SE    the spread of the per-seed gaps, std / sqrt(seeds): what another set of seeds
             would move. It is the one decisions use.
  item SE    the paired SE over test items of the seed-averaged per-item difference: what
             another sample of test items would move (the floor the test split sets).
"""

from __future__ import annotations

import math

import numpy as np

Z_DECIDES = 2.0   # |effect| / SE from which a finding counts as shown, either way


def seed_gap(pretrained_correct, scratch_correct) -> dict:
  """Gap statistics of S paired runs: two lists of S per-item 0/1 correctness lists."""
  a = np.asarray(pretrained_correct, np.float64)
  b = np.asarray(scratch_correct, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f'paired runs need equal S x N correctness arrays, got {a.shape} and '
                     f'{b.shape}')
  seeds, n = a.shape
  per_seed = a.mean(1) - b.mean(1)
  item_diff = (a - b).mean(0)
  return {'gap': float(per_seed.mean()),
          'seed_se': float(per_seed.std(ddof=1) / math.sqrt(seeds)) if seeds > 1 else
                     float('nan'),
          'item_se': float(item_diff.std(ddof=1) / math.sqrt(n)),
          'per_seed': [float(g) for g in per_seed],
          'pretrained': float(a.mean()), 'scratch': float(b.mean()),
          'seeds': seeds, 'n_test': n}


def ols_slope(x, y) -> dict:
  """Least-squares slope of y on x with its classical SE (residual variance, n - 2 dof)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.shape != y.shape or len(x) < 3 or np.ptp(x) == 0:
    raise ValueError('a slope with an SE needs at least 3 points and 2 distinct x values')
  xc = x - x.mean()
  slope = float((xc * (y - y.mean())).sum() / (xc ** 2).sum())
  resid = y - y.mean() - slope * xc
  se = math.sqrt(float((resid ** 2).sum()) / (len(x) - 2) / float((xc ** 2).sum()))
  return {'slope': slope, 'se': se, 'points': len(x)}


def verdict(effect: float, se: float, claim: str) -> str:
  """'reproduced', 'not reproduced' or 'not decidable at this scale', with the figure.

  The companion paper claims effect > 0. It is reproduced at effect >= Z_DECIDES SE; not
  reproduced when the opposite sign is shown as firmly; otherwise undecided, and the
  sentence states the smallest effect the design could have shown (its power).
  """
  if not math.isfinite(se) or se <= 0:
    return f'not decidable at this scale: {claim} = {effect:+.4f} has no standard error'
  z = effect / se
  figure = f'{claim} = {effect:+.4f} ± {se:.4f} ({z:+.1f} SE)'
  if z >= Z_DECIDES:
    return f'reproduced: {figure}'
  if z <= -Z_DECIDES:
    return f'not reproduced (the opposite is shown): {figure}'
  return (f'not decidable at this scale: {figure}; this design detects only effects of '
          f'about {Z_DECIDES * se:.4f} or more')
