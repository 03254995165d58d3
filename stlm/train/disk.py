"""Disk space for checkpoints: how much a save needs, how much is free, and what an I/O error
of a save looks like.

A checkpoint needs about as much as the newest one on disk (or, before the first, the bytes of
the train state), plus a margin for the data iterator, metadata and filesystem rounding. The
train loop asks before training and before each save, so a full disk stops a run with one line
and its newest intact checkpoint, instead of with a half-written one and a page of tracebacks.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys

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


class QuietIoFailures:
  """While installed, a failed background save prints nothing of its own: Orbax's ERROR records
  whose exception is an I/O failure (`is_io_error`), and asyncio's 'Event loop is closed' raised
  in callbacks of the aborted writes, are dropped. The save's caller reports the failure in
  one line. Nothing is dropped at absl verbosity >= 1 (`--verbosity=1`).
  """

  _LOOP_CLOSED = 'Event loop is closed'

  def __init__(self):
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    self._logger = logging.getLogger('absl')
    self._active = absl_logging.get_verbosity() < 1
    self._previous_hooks = None

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not ((error is not None and is_io_error(error)) or
                any(text in record.getMessage() for text in IO_TEXTS))

  def _hook(self, kind, value, tb):
    if not self._loop_closed(value):
      self._previous_hooks[0](kind, value, tb)

  def _unraisable_hook(self, unraisable):
    if not self._loop_closed(unraisable.exc_value):
      self._previous_hooks[1](unraisable)

  def _loop_closed(self, error) -> bool:
    return isinstance(error, RuntimeError) and str(error) == self._LOOP_CLOSED

  def install(self) -> 'QuietIoFailures':
    if self._active:
      self._logger.addFilter(self)
      self._previous_hooks = (sys.excepthook, sys.unraisablehook)
      sys.excepthook, sys.unraisablehook = self._hook, self._unraisable_hook
    return self

  def remove(self) -> None:
    if self._active and self._previous_hooks is not None:
      self._logger.removeFilter(self)
      if sys.excepthook == self._hook:
        sys.excepthook = self._previous_hooks[0]
      if sys.unraisablehook == self._unraisable_hook:
        sys.unraisablehook = self._previous_hooks[1]
      self._previous_hooks = None
