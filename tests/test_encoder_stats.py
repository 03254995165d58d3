"""Tests for stlm/experiments/encoder_stats: paired seed gaps, slopes and verdicts."""

import math

import numpy as np
import pytest

from stlm.experiments import encoder_stats


def test_seed_gap_pairs_seed_s_with_seed_s():
  pre = [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]     # accuracies .5, .75, .25
  scr = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]     # .25, .5, 0
  g = encoder_stats.seed_gap(pre, scr)
  assert g['per_seed'] == pytest.approx([0.25, 0.25, 0.25])
  assert g['gap'] == pytest.approx(0.25)
  assert g['seed_se'] == pytest.approx(0.0)             # every seed agrees
  item = (np.asarray(pre) - np.asarray(scr)).mean(0)    # 1/3, 1/3, 1/3, 0
  assert g['item_se'] == pytest.approx(item.std(ddof=1) / 2)
  assert (g['pretrained'], g['scratch'], g['seeds'], g['n_test']) == (0.5, 0.25, 3, 4)


def test_seed_gap_spread_and_shape_errors():
  g = encoder_stats.seed_gap([[1, 1], [0, 0]], [[0, 0], [0, 0]])
  assert g['per_seed'] == [1.0, 0.0]
  assert g['seed_se'] == pytest.approx(np.std([1.0, 0.0], ddof=1) / math.sqrt(2))
  assert math.isnan(encoder_stats.seed_gap([[1, 0]], [[0, 0]])['seed_se'])
  with pytest.raises(ValueError, match='equal S x N'):
    encoder_stats.seed_gap([[1, 0]], [[1, 0, 1]])


def test_ols_slope_recovers_a_line_and_its_noise():
  x = np.arange(6.0)
  exact = encoder_stats.ols_slope(x, 2 * x + 1)
  assert exact['slope'] == pytest.approx(2.0) and exact['se'] == pytest.approx(0.0, abs=1e-12)
  noisy = encoder_stats.ols_slope([0, 0, 1, 1], [0, 2, 1, 3])
  assert noisy['slope'] == pytest.approx(1.0)
  # residuals -1, 1, -1, 1: sigma^2 = 4 / 2, Sxx = 1
  assert noisy['se'] == pytest.approx(math.sqrt(2.0))
  with pytest.raises(ValueError, match='at least 3 points'):
    encoder_stats.ols_slope([1, 1, 1], [0, 1, 2])


@pytest.mark.parametrize('effect, se, start', [
    (0.05, 0.02, 'reproduced: '),
    (-0.05, 0.02, 'not reproduced (the opposite is shown): '),
    (0.01, 0.02, 'not decidable at this scale: '),
    (0.01, float('nan'), 'not decidable at this scale: '),
])
def test_verdict(effect, se, start):
  sentence = encoder_stats.verdict(effect, se, 'gap')
  assert sentence.startswith(start)
  assert f'{effect:+.4f}' in sentence


def test_undecided_verdict_states_its_power():
  assert 'effects of about 0.0400 or more' in encoder_stats.verdict(0.01, 0.02, 'gap')
