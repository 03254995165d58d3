"""Block sizes and per-backend limits of the Pallas flash attention, all in one place.

Nothing here was tuned on hardware (see kernels/README.md): the numbers follow the
FlashAttention-2 Triton tutorial and JAX's own Pallas attention kernels, and respect
each backend's hard constraints:
- GPU (Triton): every block dimension a power of two and >= 16 (tl.dot's minimum);
  head_dim is padded to a power of two for the same reason.
- TPU (Mosaic): the key block is the lane (last) dimension of the score tile, so a
  multiple of 128; the query block is the sublane dimension, a multiple of 16 (bf16
  packs two rows per sublane). K/V of one head stay resident in VMEM, whose size caps S.
"""

import dataclasses
import math

BACKENDS = ('gpu', 'tpu')
# Head dims 32..256, and 16 (tl.dot's minimum tile) because the tiny and 10m presets have
# head_dim 16 and 20.
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
# Resident K/V (forward, dQ) or Q/dO (dK/dV) must fit in scoped VMEM with double buffering.
TPU_VMEM_BUDGET_BYTES = 48 * 2**20
_TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Rows of queries (q) and keys (k) per tile, for each of the three kernels."""
  block_q: int          # forward: query rows per program
  block_k: int          # forward: keys per inner-loop step
  block_q_dq: int       # dQ kernel: query rows per program
  block_k_dq: int       # dQ kernel: keys per inner-loop step
  block_q_dkv: int      # dK/dV kernel: queries per inner-loop step
  block_k_dkv: int      # dK/dV kernel: keys per program
  num_warps: int = 4    # GPU only
  num_stages: int = 2   # GPU only

  @property
  def q_multiple(self) -> int:
    # All blocks are powers of two, so the largest is a multiple of the others.
    return max(self.block_q, self.block_q_dq, self.block_q_dkv)

  @property
  def k_multiple(self) -> int:
    return max(self.block_k, self.block_k_dq, self.block_k_dkv)


def padded_head_dim(backend: str, head_dim: int) -> int:
  """Triton needs power-of-two tiles; Mosaic takes a full-extent last dimension as is."""
  return 1 << (head_dim - 1).bit_length() if backend == 'gpu' else head_dim


def _min_blocks(backend: str) -> tuple[int, int]:
  return (16, 16) if backend == 'gpu' else (16, _TPU_LANES)


def default_block_sizes(backend: str, head_dim_padded: int) -> BlockSizes:
  """Untuned defaults per backend (why: module docstring and kernels/README.md)."""
  if backend == 'gpu':
    if head_dim_padded <= 64:
      return BlockSizes(128, 64, 64, 64, 64, 64, num_warps=4, num_stages=2)
    if head_dim_padded <= 128:
      return BlockSizes(128, 64, 64, 64, 64, 64, num_warps=8, num_stages=2)
    # D=256: the f32 accumulators of a 128-row tile would spill registers.
    return BlockSizes(64, 32, 32, 32, 32, 32, num_warps=8, num_stages=2)
  if backend == 'tpu':
    return BlockSizes(128, 128, 128, 128, 128, 128)
  raise ValueError(f'backend {backend!r} unknown; choose one of {BACKENDS}')


def check(blocks: BlockSizes, backend: str) -> None:
  """Raises ValueError if user-given blocks break the backend's tiling rules."""
  min_q, min_k = _min_blocks(backend)
  for field in dataclasses.fields(BlockSizes)[:6]:
    value = getattr(blocks, field.name)
    minimum = min_k if field.name.startswith('block_k') else min_q
    if value < minimum or value & (value - 1):
      raise ValueError(f'flash_attention: block_sizes.{field.name}={value} unsupported on '
                       f'{backend}; supported: a power of two >= {minimum}')


def _fit(block: int, length: int, minimum: int) -> int:
  """Shrinks a block to the next power of two >= length (at least `minimum`)."""
  return min(block, max(minimum, 1 << max(length - 1, 0).bit_length()))


def fit_to_lengths(blocks: BlockSizes, backend: str, q_len: int, kv_len: int) -> BlockSizes:
  """Short sequences get smaller tiles so padding wastes at most one small tile."""
  min_q, min_k = _min_blocks(backend)
  return dataclasses.replace(
      blocks,
      block_q=_fit(blocks.block_q, q_len, min_q),
      block_q_dq=_fit(blocks.block_q_dq, q_len, min_q),
      block_q_dkv=_fit(blocks.block_q_dkv, q_len, min_q),
      block_k=_fit(blocks.block_k, kv_len, min_k),
      block_k_dq=_fit(blocks.block_k_dq, kv_len, min_k),
      block_k_dkv=_fit(blocks.block_k_dkv, kv_len, min_k))


def round_up(n: int, multiple: int) -> int:
  return math.ceil(n / multiple) * multiple


def tpu_vmem_bytes(q_len_padded: int, kv_len_padded: int, head_dim: int, group: int,
                   itemsize: int) -> int:
  """VMEM the largest resident operands need (double-buffered), for the TPU limit check."""
  kv_resident = 2 * 2 * kv_len_padded * head_dim * itemsize       # K and V, fwd and dQ
  # dK/dV kernel: Q and dO of the whole group, plus lse and delta padded to 128 lanes.
  q_resident = 2 * group * q_len_padded * (2 * head_dim * itemsize + 2 * 4 * _TPU_LANES)
  return max(kv_resident, q_resident)
