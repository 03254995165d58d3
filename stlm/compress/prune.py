"""Magnitude pruning to an exact sparsity: the round(sparsity x n) smallest |w| are zeroed.

Scope 'layer' prunes each array to the target on its own; 'global' ranks every selected
weight together, so arrays of small weights lose more. Ties are broken by position (a stable
sort), so the count is exact even where many weights share a magnitude.
"""

from __future__ import annotations

import numpy as np

SCOPES = ('layer', 'global')


def _keep_mask(magnitudes: np.ndarray, num_zeroed: int) -> np.ndarray:
  keep = np.ones(magnitudes.size, bool)
  keep[np.argsort(magnitudes, kind='stable')[:num_zeroed]] = False
  return keep


def keep_masks(arrays: dict[str, np.ndarray], sparsity: float,
               scope: str) -> dict[str, np.ndarray]:
  """Per name, a boolean array of its shape: True where the weight stays."""
  if scope not in SCOPES:
    raise ValueError(f'unknown pruning scope {scope!r}; choose from {", ".join(SCOPES)}')
  names = sorted(arrays)
  if scope == 'layer':
    return {n: _keep_mask(np.abs(arrays[n]).ravel(), round(sparsity * arrays[n].size)).reshape(
        arrays[n].shape) for n in names}
  flat = np.concatenate([np.abs(np.asarray(arrays[n], np.float32)).ravel() for n in names])
  keep = _keep_mask(flat, round(sparsity * flat.size))
  out, start = {}, 0
  for n in names:
    size = arrays[n].size
    out[n] = keep[start:start + size].reshape(arrays[n].shape)
    start += size
  return out
