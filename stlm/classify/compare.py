"""Two classifiers scored on the same test items: the accuracy gap and its standard errors.

  python -m stlm.classify.compare <a.json> <b.json>     # e.g. pretrained.json scratch.json

The records are stlm.classify's JSON for a text task: they carry `test_correct` (0/1 per test
item, in test order) and `test_sha256` (a digest of the test split's texts and labels, in
order); two records scored on different test items are refused.

Paired standard error (both arms score the same n items): with d_i = correct_a_i - correct_b_i,
  gap = mean(d),  SE_paired = std(d, ddof=1) / sqrt(n)
(the paired t / McNemar-style standard error of a difference of two accuracies on one test
set). The combined SE sqrt(se_a^2 + se_b^2) treats the arms as independent samples; when
their predictions correlate (the usual case) the paired SE is the smaller, correct one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import numpy as np


def test_split_digest(texts, labels) -> str:
  """sha256 of the test split's (label, text) rows in order: equal digests = same items."""
  if len(texts) != len(labels):
    raise ValueError(f'{len(texts)} texts but {len(labels)} labels')
  h = hashlib.sha256()
  for text, label in zip(texts, labels):
    h.update(f'{int(label)}\t{text}\n'.encode('utf-8'))
  return h.hexdigest()


def correctness(pred, labels) -> list[int]:
  """1 where the prediction equals the label, else 0, in test order."""
  pred, labels = np.asarray(pred), np.asarray(labels)
  if pred.shape != labels.shape:
    raise ValueError(f'predictions {pred.shape} and labels {labels.shape} differ in shape')
  return [int(x) for x in (pred == labels)]


def paired_gap(correct_a, correct_b) -> tuple[float, float]:
  """(mean(d), std(d, ddof=1) / sqrt(n)) with d = correct_a - correct_b per test item."""
  a = np.asarray(correct_a, np.float64)
  b = np.asarray(correct_b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f'per-item correctness of different shapes: {a.shape} vs {b.shape}')
  if len(a) < 2:
    raise ValueError(f'a paired standard error needs at least 2 test items (got {len(a)})')
  d = a - b
  return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def _z(gap: float, se: float) -> float:
  if se > 0:
    return gap / se
  return 0.0 if gap == 0 else math.copysign(math.inf, gap)


def _items(rec: dict, name: str):
  missing = [k for k in ('test_correct', 'test_sha256', 'accuracy', 'stderr') if k not in rec]
  if missing:
    raise ValueError(f'{name}: no {", ".join(missing)} in the record (a text-task record of '
                     'stlm.classify from this version is needed; FewRel records have none)')
  return rec['test_correct'], rec['test_sha256']


def compare(a: dict, b: dict, names=('a', 'b')) -> dict:
  """Gap a - b with its paired and combined SE; refuses records on different test items."""
  ca, ha = _items(a, names[0])
  cb, hb = _items(b, names[1])
  if ha != hb or len(ca) != len(cb):
    raise ValueError(f'{names[0]} and {names[1]} were scored on different test items '
                     f'(test_sha256 {ha[:12]}... n={len(ca)} vs {hb[:12]}... n={len(cb)}): '
                     'use the same task, data, split flags and --seed')
  gap, se_paired = paired_gap(ca, cb)
  se_combined = math.sqrt(a['stderr'] ** 2 + b['stderr'] ** 2)
  d = np.asarray(ca) - np.asarray(cb)
  return {'n_test': len(ca), 'accuracy_a': a['accuracy'], 'stderr_a': a['stderr'],
          'accuracy_b': b['accuracy'], 'stderr_b': b['stderr'], 'gap': gap,
          'se_paired': se_paired, 'z_paired': _z(gap, se_paired),
          'se_combined': se_combined, 'z_combined': _z(gap, se_combined),
          'only_a_right': int((d > 0).sum()), 'only_b_right': int((d < 0).sum())}


def format_comparison(c: dict, task: str, names=('a', 'b')) -> str:
  return (f'{task}: {names[0]} {c["accuracy_a"]:.4f} ± {c["stderr_a"]:.4f}, {names[1]} '
          f'{c["accuracy_b"]:.4f} ± {c["stderr_b"]:.4f} (n_test={c["n_test"]})\n'
          f'  gap {c["gap"]:+.4f} ± {c["se_paired"]:.4f} paired SE ({c["z_paired"]:+.1f} SE); '
          f'± {c["se_combined"]:.4f} combined SE ({c["z_combined"]:+.1f} SE); items right '
          f'only in {names[0]}: {c["only_a_right"]}, only in {names[1]}: {c["only_b_right"]}')


def main(argv) -> int:
  if len(argv) != 3:
    print(__doc__.splitlines()[2].strip(), file=sys.stderr)
    return 2
  recs = []
  for path in argv[1:]:
    with open(path, encoding='utf-8') as f:
      recs.append(json.load(f))
  names = tuple(os.path.splitext(os.path.basename(p))[0] for p in argv[1:])
  if names[0] == names[1]:
    names = tuple(argv[1:])   # same file names in two folders: the paths tell them apart
  try:
    c = compare(recs[0], recs[1], names)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(format_comparison(c, recs[0].get('task', '?'), names))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
