"""Disk space for checkpoints: how much a save needs, how much is free, and what an I/O error
of a save looks like.

A checkpoint needs about as much as the newest one on disk (or, before the first, the bytes of
the train state), plus a margin for the data iterator, metadata and filesystem rounding. The
train loop asks before training and before each save, so a full disk stops a run with one line
and its newest intact checkpoint, instead of with a half-written one and a page of tracebacks.
"""

from __future__ import annotations

import errno
import os
import shutil

import jax

# Multiplier and fixed allowance on top of the estimated checkpoint size.
MARGIN = 1.1
SLACK_BYTES = 4 << 20
# errno values, and the texts libraries (tensorstore, Orbax) put in their own exceptions for
# them, of a write that failed for lack of room or permission rather than a bug.
IO_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
IO_TEXTS = ('No space left on device', 'Disk quota exceeded', 'Read-only file system',
            'RESOURCE_EXHAUSTED', 'Permission denied')


class DiskSpaceError(RuntimeError):
  """Too little free space for the next checkpoint (the message: needed, free, path)."""


def free_bytes(path: str) -> int:
  """Free bytes, for this user, on the filesystem of `path` (or its nearest existing parent)."""
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def tree_bytes(path: str) -> int:
  """Bytes of the files under `path` (0 if it does not exist)."""
  total = 0
  for root, _, names in os.walk(path):
    for name in names:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass   # removed while walking (Orbax's garbage collection)
  return total


def state_bytes(state) -> int:
  """Bytes of every array of a (possibly abstract) train state, whole (all shards)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state)
             if hasattr(x, 'dtype'))


def needed_bytes(estimate: int) -> int:
  return int(estimate * MARGIN) + SLACK_BYTES


def shortfall(directory: str, estimate: int) -> str | None:
  """'needs X MB, Y MB free at <directory>' when the free space is below needed_bytes(estimate),
  else None."""
  need, free = needed_bytes(estimate), free_bytes(directory)
  if free >= need:
    return None
  return (f'the next checkpoint needs about {need / 2**20:.1f} MB but only {free / 2**20:.1f} MB '
          f'are free at {directory}')


def is_io_error(error: BaseException) -> bool:
  """Whether `error` (or an exception it was raised from) is a failed write for lack of room
  or permission."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in IO_ERRNOS:
      return True
    if any(text in str(error) for text in IO_TEXTS):
      return True
    error = error.__cause__ or error.__context__
  return False


def short_reason(error: BaseException) -> str:
  """The first line naming the I/O failure, without the library's stack of context."""
  for line in str(error).splitlines():
    if any(text in line for text in IO_TEXTS):
      return line.strip()[:300]
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return (str(error).splitlines() or [type(error).__name__])[0][:300]
