"""Low-rank factorisation of a matrix by truncated SVD: w_KxN ~ a_KxR @ b_RxN.

The singular values are split evenly between the factors (sqrt on each side) so that both
have similar ranges, which matters when the factors are then quantised.
"""

from __future__ import annotations

import numpy as np


def rank_for_energy(s: np.ndarray, energy: float) -> int:
  """The smallest rank whose singular values hold `energy` of the sum of their squares."""
  power = np.cumsum(np.asarray(s, np.float64) ** 2)
  if power[-1] == 0:
    return 1
  return int(min(np.searchsorted(power / power[-1], energy - 1e-12) + 1, len(s)))


def factor(w_KxN: np.ndarray, rank: int | None = None,
           energy: float | None = None) -> tuple[np.ndarray, np.ndarray, int]:
  """(a_KxR, b_RxN, R), R = `rank` (at most min(K, N)) or the rank holding `energy`."""
  u_KxM, s_M, vt_MxN = np.linalg.svd(np.asarray(w_KxN, np.float64), full_matrices=False)
  r = min(rank, len(s_M)) if rank is not None else rank_for_energy(s_M, energy)
  root_R = np.sqrt(s_M[:r])
  a_KxR = (u_KxM[:, :r] * root_R).astype(np.float32)
  b_RxN = (root_R[:, None] * vt_MxN[:r]).astype(np.float32)
  return a_KxR, b_RxN, r
