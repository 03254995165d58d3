"""One run per workdir: an exclusive lease file, <workdir>/lease.json, held while training.

A scheduler that requeues a job while its first copy still runs, or a user who starts the same
command twice, would otherwise have two processes write the same checkpoints, metrics and
export. The lease records host, pid, a random token, the start time and a heartbeat that a
background thread renews every `heartbeat_s`. A second start is refused (`LeaseHeldError`,
naming the holder). A lease is stale, and taken over with a warning, when its pid is dead on
this host, or when its heartbeat is older than `stale_s` (another host: its pid cannot be
checked from here). The normal resume after a crash needs no flag: a killed run's pid is dead.

Taking a lease is atomic: the file is created with O_EXCL; a stale one is first renamed to a
name of the taker's own (only one taker's rename succeeds), so two takers never both win.
Released on every exit path that runs Python (`with`; a SIGKILL leaves a stale lease that the
next start takes over). Readers (eval, export, report) need no lease.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid

LEASE_FILE = 'lease.json'


class LeaseHeldError(RuntimeError):
  """The workdir is leased by another live run."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # exists, owned by someone else
    return True
  return True


def read(workdir: str) -> dict | None:
  """The lease of workdir, or None when there is none (or it cannot be parsed)."""
  try:
    with open(os.path.join(workdir, LEASE_FILE), encoding='utf-8') as f:
      lease = json.load(f)
  except (OSError, ValueError):
    return None
  return lease if isinstance(lease, dict) else None


def staleness(lease: dict, stale_s: float, now: float | None = None) -> str | None:
  """Why `lease` is stale ('pid N is not running on H', 'no heartbeat for N s'), else None."""
  now = time.time() if now is None else now
  if lease.get('host') == socket.gethostname() and isinstance(lease.get('pid'), int):
    if not _pid_alive(lease['pid']):
      return f"pid {lease['pid']} is not running on {lease['host']}"
    return None
  age = now - float(lease.get('heartbeat', 0.0))
  if age > stale_s:
    return f'no heartbeat for {age:.0f} s (stale after {stale_s:.0f} s)'
  return None


def describe(lease: dict, now: float | None = None) -> str:
  now = time.time() if now is None else now
  return (f"pid {lease.get('pid')} on {lease.get('host')}, started {lease.get('started')}, "
          f"heartbeat {now - float(lease.get('heartbeat', 0.0)):.0f} s ago")


class WorkdirLease:
  """Context manager: holds <workdir>/lease.json for the duration (see the module docstring).

  enabled=False (processes other than 0 of a multi-process run) makes it a no-op. `log`
  receives the one-line warning of a takeover. A workdir the lease had to create is removed
  again on release when nothing else was written into it.
  """

  def __init__(self, workdir: str, *, stale_s: float = 300.0, heartbeat_s: float = 30.0,
               enabled: bool = True, log=print):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LEASE_FILE)
    self.stale_s, self.heartbeat_s = float(stale_s), float(heartbeat_s)
    self.enabled, self.log = enabled, log
    self.token = uuid.uuid4().hex
    self._created_dir = False
    self._stop = threading.Event()
    self._thread = None

  def _record(self, started: str) -> dict:
    return dict(host=socket.gethostname(), pid=os.getpid(), token=self.token,
                started=started, heartbeat=time.time())

  def _write_new(self, record: dict) -> bool:
    """Creates the lease file with O_EXCL; False when one exists."""
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(record, f)
    return True

  def acquire(self) -> None:
    if not self.enabled:
      return
    if not os.path.isdir(self.workdir):
      os.makedirs(self.workdir, exist_ok=True)
      self._created_dir = True
    started = time.strftime('%Y-%m-%dT%H:%M:%S%z')
    for _ in range(3):   # a holder may release between our look and our create
      if self._write_new(self._record(started)):
        break
      held = read(self.workdir)
      if held is None:   # vanished, or half-written by a taker: look again shortly
        time.sleep(0.05)
        held = read(self.workdir)
        if held is None:
          aside = f'{self.path}.unreadable.{self.token}'
          _rename_if_exists(self.path, aside)
          continue
      why = staleness(held, self.stale_s)
      if why is None:
        raise LeaseHeldError(
            f'{self.workdir} is in use by another run ({describe(held)}); wait for it to end, '
            f'or use another --workdir (its lease: {self.path})')
      # Rename first: of several takers only one rename succeeds.
      aside = f'{self.path}.stale.{self.token}'
      if _rename_if_exists(self.path, aside):
        os.remove(aside)
        self.log(f'warning: took over the stale lease of {self.workdir} '
                 f'({describe(held)}: {why})')
    else:
      raise LeaseHeldError(f'{self.workdir}: could not take its lease {self.path}')
    self._thread = threading.Thread(target=self._beat, name='stlm-lease', daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      held = read(self.workdir)
      if not held or held.get('token') != self.token:
        self.log(f'warning: the lease of {self.workdir} is no longer this run\'s '
                 f'({describe(held) if held else "removed"}); stopped renewing it')
        return
      held['heartbeat'] = time.time()
      tmp = f'{self.path}.{self.token}.tmp'
      with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(held, f)
      os.replace(tmp, self.path)

  def release(self) -> None:
    if not self.enabled:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    held = read(self.workdir)
    if held and held.get('token') == self.token:
      os.remove(self.path)
    if self._created_dir:
      try:
        os.rmdir(self.workdir)   # only if nothing else was written there
      except OSError:
        pass

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
    return False


def _rename_if_exists(src: str, dst: str) -> bool:
  try:
    os.rename(src, dst)
  except OSError as e:
    if e.errno == errno.ENOENT:
      return False
    raise
  return True
