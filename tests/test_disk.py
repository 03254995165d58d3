"""Disk-space estimates and the recognition of a save's I/O failure."""

import errno

import numpy as np

from stlm.train import disk


def test_shortfall_names_needed_free_and_path(tmp_path, monkeypatch):
  monkeypatch.setattr(disk, 'free_bytes', lambda path: 3 << 20)
  why = disk.shortfall(str(tmp_path), 10 << 20)
  assert why == (f'the next checkpoint needs about {disk.needed_bytes(10 << 20) / 2**20:.1f} MB'
                 f' but only 3.0 MB are free at {tmp_path}')
  monkeypatch.setattr(disk, 'free_bytes', lambda path: 1 << 40)
  assert disk.shortfall(str(tmp_path), 10 << 20) is None


def test_free_bytes_of_a_path_not_yet_created_is_its_parents(tmp_path):
  assert disk.free_bytes(str(tmp_path / 'a' / 'b')) == disk.free_bytes(str(tmp_path))


def test_sizes_of_a_tree_and_of_a_state(tmp_path):
  (tmp_path / 'd').mkdir()
  (tmp_path / 'd' / 'x').write_bytes(b'1' * 100)
  (tmp_path / 'y').write_bytes(b'1' * 23)
  assert disk.tree_bytes(str(tmp_path)) == 123 and disk.tree_bytes(str(tmp_path / 'no')) == 0
  state = {'w': np.zeros((4, 8), np.float32), 'step': np.int32(3), 'name': 'not an array'}
  assert disk.state_bytes(state) == 4 * 8 * 4 + 4


def test_io_errors_are_told_from_bugs_through_their_chain():
  assert disk.is_io_error(OSError(errno.ENOSPC, 'No space left on device'))
  assert disk.is_io_error(OSError(errno.EROFS, 'Read-only file system'))
  wrapped = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": No space left on device')
  assert disk.is_io_error(wrapped)
  try:
    try:
      raise OSError(errno.EDQUOT, 'Disk quota exceeded')
    except OSError as inner:
      raise RuntimeError('save failed') from inner
  except RuntimeError as outer:
    assert disk.is_io_error(outer)
  assert not disk.is_io_error(ValueError('shapes (3,) and (4,) do not match'))
  assert disk.short_reason(ValueError('Traceback...\nRESOURCE_EXHAUSTED: No space left on device'
                                      '\nmore')) == 'RESOURCE_EXHAUSTED: No space left on device'


def test_a_failed_saves_own_tracebacks_are_dropped_and_nothing_else(monkeypatch):
  import logging
  import sys
  from absl import logging as absl_logging
  monkeypatch.setattr(absl_logging, 'get_verbosity', lambda: 0)
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: seen.append(str(u.exc_value)))
  quiet = disk.QuietIoFailures().install()
  try:
    def record(level, msg, error=None):
      return logging.LogRecord('absl', level, __file__, 1, msg, (),
                               (type(error), error, None) if error else None)
    no_space = OSError(errno.ENOSPC, 'No space left on device')
    assert not quiet.filter(record(logging.ERROR, 'Save Finalize thread failed.', no_space))
    assert not quiet.filter(record(logging.ERROR, 'RESOURCE_EXHAUSTED: Error writing x'))
    assert quiet.filter(record(logging.ERROR, 'a bug', ValueError('shapes differ')))
    assert quiet.filter(record(logging.WARNING, 'No space left on device'))
    unraisable = lambda e: type('U', (), {'exc_value': e, 'exc_type': type(e),
                                          'exc_traceback': None, 'object': None})()
    sys.unraisablehook(unraisable(RuntimeError('Event loop is closed')))
    sys.unraisablehook(unraisable(RuntimeError('something else')))
    assert seen == ['something else']
  finally:
    quiet.remove()
  assert sys.unraisablehook is not quiet._unraisable_hook   # pylint: disable=protected-access
  monkeypatch.setattr(absl_logging, 'get_verbosity', lambda: 1)   # --verbosity=1: all shown
  loud = disk.QuietIoFailures().install()
  assert loud not in logging.getLogger('absl').filters
  loud.remove()
