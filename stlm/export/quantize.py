"""Symmetric integer quantisation of a matrix, one scale per group of rows in each column.

A matrix w_KxN is cut along K into groups of `group_size` rows (0: one group, i.e. one scale
per column, "per channel"); each group of each column gets scale = max|w| / qmax, and
q = round(w / scale) in [-qmax, qmax]. Every weight then comes back within scale / 2 of its
value, so the error of a group is at most max|w_group| / (2 qmax). The range is symmetric
(int4 uses -7..7, not -8) so that a zero, e.g. a pruned weight, stays exactly zero.

int4 values are stored two to a byte (`pack_int4`), so an int4 matrix really takes half the
bytes of an int8 one on disk.
"""

from __future__ import annotations

import numpy as np

QMAX = {8: 127, 4: 7}


def num_groups(rows: int, group_size: int) -> int:
  g = group_size or rows
  return -(-rows // g)


def quantize(w_KxN: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(q_KxN int8, scale_GxN float32) with G = ceil(K / group_size)."""
  qmax = QMAX[bits]
  w_KxN = np.asarray(w_KxN, np.float32)
  k, n = w_KxN.shape
  g = group_size or k
  groups = num_groups(k, group_size)
  padded_GgxN = np.zeros((groups * g, n), np.float32)
  padded_GgxN[:k] = w_KxN
  w_GxgxN = padded_GgxN.reshape(groups, g, n)
  scale_GxN = np.abs(w_GxgxN).max(axis=1) / qmax
  safe_GxN = np.where(scale_GxN > 0, scale_GxN, 1.0)   # an all-zero group: q = 0
  q_GxgxN = np.clip(np.rint(w_GxgxN / safe_GxN[:, None, :]), -qmax, qmax)
  return q_GxgxN.reshape(groups * g, n)[:k].astype(np.int8), scale_GxN.astype(np.float32)


def dequantize(q_KxN: np.ndarray, scale_GxN: np.ndarray, group_size: int) -> np.ndarray:
  k = q_KxN.shape[0]
  g = group_size or k
  scale_KxN = np.repeat(np.asarray(scale_GxN, np.float32), g, axis=0)[:k]
  return q_KxN.astype(np.float32) * scale_KxN


def pack_int4(q: np.ndarray) -> np.ndarray:
  """Values in -7..7 as uint8, two per byte (the first in the low nibble); odd counts padded."""
  flat = np.asarray(q, np.int16).ravel() + 8          # 1..15
  if flat.size % 2:
    flat = np.concatenate([flat, np.full(1, 8, np.int16)])
  return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
  packed = np.asarray(packed, np.uint8)
  out = np.empty(packed.size * 2, np.int8)
  out[0::2] = (packed & 0x0F).astype(np.int8) - 8
  out[1::2] = (packed >> 4).astype(np.int8) - 8
  return out[:count]
