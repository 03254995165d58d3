"""Tests for stlm/classify/compare.py: the paired SE of an accuracy gap, the combined SE, the
test-split digest and the refusal of records scored on different test items."""

import json
import math

import numpy as np
import pytest

from stlm.classify import compare


def _record(correct, texts, labels):
  acc = float(np.mean(correct))
  return {'task': 'agnews', 'accuracy': acc, 'stderr': math.sqrt(acc * (1 - acc) / len(correct)),
          'test_correct': list(correct), 'test_sha256': compare.test_split_digest(texts, labels)}


TEXTS = ['w1', 'w2', 'w3', 'w4', 'w5']
LABELS = [0, 1, 2, 3, 0]


def test_paired_se_by_hand():
  # d = [0, 1, 0, 1, -1]: mean 0.2; squared deviations .04 + .64 + .04 + .64 + 1.44 = 2.8;
  # var (ddof=1) = 2.8 / 4 = 0.7; SE = sqrt(0.7 / 5) = sqrt(0.14).
  gap, se = compare.paired_gap([1, 1, 0, 1, 0], [1, 0, 0, 0, 1])
  assert gap == pytest.approx(0.2)
  assert se == pytest.approx(math.sqrt(0.14))
  with pytest.raises(ValueError, match='different shapes'):
    compare.paired_gap([1, 0, 1], [1, 0])
  with pytest.raises(ValueError, match='at least 2'):
    compare.paired_gap([1], [0])


def test_compare_gives_paired_and_combined_se():
  a = _record([1, 1, 0, 1, 0], TEXTS, LABELS)
  b = _record([1, 0, 0, 0, 1], TEXTS, LABELS)
  c = compare.compare(a, b)
  assert (c['n_test'], c['only_a_right'], c['only_b_right']) == (5, 2, 1)
  assert c['gap'] == pytest.approx(0.2) and c['se_paired'] == pytest.approx(math.sqrt(0.14))
  # Combined: sqrt(0.6*0.4/5 + 0.4*0.6/5) = sqrt(0.096).
  assert c['se_combined'] == pytest.approx(math.sqrt(0.096))
  assert c['z_paired'] == pytest.approx(0.2 / math.sqrt(0.14))
  # Correlated predictions (b = a but one item): the paired SE is far below the combined one.
  n = 400
  rng = np.random.default_rng(0)
  right = (rng.random(n) < 0.7).astype(int)
  other = right.copy()
  other[np.flatnonzero(right)[:12]] = 0     # b wrong on 12 items a got right
  texts, labels = [f't{i}' for i in range(n)], [0] * n
  c = compare.compare(_record(right, texts, labels), _record(other, texts, labels))
  assert c['gap'] == pytest.approx(12 / n)
  assert c['se_paired'] < c['se_combined'] / 3
  assert c['z_paired'] > 3 > c['z_combined']


def test_refuses_different_test_items(tmp_path):
  a = _record([1, 1, 0, 1, 0], TEXTS, LABELS)
  for texts, labels in ((TEXTS[::-1], LABELS[::-1]),            # same items, other order
                        (TEXTS, [0, 1, 2, 3, 1]),               # one label differs
                        (TEXTS[:4] + ['w6'], LABELS)):          # one text differs
    b = _record([1, 0, 0, 0, 1], texts, labels)
    with pytest.raises(ValueError, match='different test items'):
      compare.compare(a, b)
  with pytest.raises(ValueError, match='no test_correct'):
    compare.compare(a, {'accuracy': 0.5, 'stderr': 0.1, 'test_sha256': 'x'})
  # The CLI: a clear error and exit status 1 on mismatch; both SEs printed on a match.
  paths = []
  for name, rec in (('p', a), ('s', _record([1, 0, 0, 0, 1], TEXTS, LABELS)),
                    ('other', _record([1, 0, 0, 0, 1], TEXTS, [0, 1, 2, 3, 1]))):
    paths.append(str(tmp_path / f'{name}.json'))
    with open(paths[-1], 'w', encoding='utf-8') as f:
      json.dump(rec, f)
  assert compare.main(['compare', paths[0], paths[2]]) == 1
  assert compare.main(['compare', paths[0], paths[1]]) == 0


def test_correctness_and_digest():
  assert compare.correctness(np.array([1, 2, 3]), [1, 0, 3]) == [1, 0, 1]
  with pytest.raises(ValueError, match='shape'):
    compare.correctness([1, 2], [1])
  assert compare.test_split_digest(TEXTS, LABELS) == compare.test_split_digest(list(TEXTS),
                                                                              list(LABELS))
  with pytest.raises(ValueError, match='5 texts but 4 labels'):
    compare.test_split_digest(TEXTS, LABELS[:4])
