"""The workdir lease: one run per workdir, stale leases taken over, released on exit."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from stlm.train import lease as lease_lib


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def _write(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  (workdir / lease_lib.LEASE_FILE).write_text(json.dumps(record))


def test_a_second_lease_is_refused_naming_the_holder_and_release_frees_it(tmp_path):
  first = lease_lib.WorkdirLease(str(tmp_path))
  with first:
    held = lease_lib.read(str(tmp_path))
    assert (held['pid'], held['host'], held['token']) == (os.getpid(), socket.gethostname(),
                                                         first.token)
    with pytest.raises(lease_lib.LeaseHeldError, match=f'pid {os.getpid()} on'):
      lease_lib.WorkdirLease(str(tmp_path)).acquire()
    assert lease_lib.read(str(tmp_path))['token'] == first.token   # the refusal changed nothing
  assert lease_lib.read(str(tmp_path)) is None
  with lease_lib.WorkdirLease(str(tmp_path)):                    # free again
    pass


def test_a_dead_pid_on_this_host_is_stale_and_taken_over_with_a_warning(tmp_path):
  pid = _dead_pid()
  _write(tmp_path, host=socket.gethostname(), pid=pid, token='old', started='x',
         heartbeat=time.time())
  lines = []
  with lease_lib.WorkdirLease(str(tmp_path), log=lines.append) as lease:
    assert lease_lib.read(str(tmp_path))['token'] == lease.token
  assert len(lines) == 1 and 'stale' in lines[0] and f'pid {pid} is not running' in lines[0]
  assert sorted(os.listdir(tmp_path)) == []     # nothing left: no renamed lease either


def test_another_hosts_lease_is_stale_only_after_its_heartbeat_stops(tmp_path):
  _write(tmp_path, host='elsewhere', pid=1, token='old', started='x', heartbeat=time.time())
  with pytest.raises(lease_lib.LeaseHeldError, match='elsewhere'):
    lease_lib.WorkdirLease(str(tmp_path), stale_s=60).acquire()
  _write(tmp_path, host='elsewhere', pid=1, token='old', started='x',
         heartbeat=time.time() - 120)
  lines = []
  with lease_lib.WorkdirLease(str(tmp_path), stale_s=60, log=lines.append):
    pass
  assert 'no heartbeat for 120 s' in lines[0]


def test_the_heartbeat_is_renewed_and_a_lost_lease_is_not(tmp_path):
  lines = []
  with lease_lib.WorkdirLease(str(tmp_path), heartbeat_s=0.05, log=lines.append) as lease:
    first = lease_lib.read(str(tmp_path))['heartbeat']
    time.sleep(0.3)
    assert lease_lib.read(str(tmp_path))['heartbeat'] > first
    _write(tmp_path, host='elsewhere', pid=1, token='thief', started='x', heartbeat=0.0)
    time.sleep(0.3)
  assert lease_lib.read(str(tmp_path))['token'] == 'thief'   # release leaves others' leases
  assert any('no longer this run' in line for line in lines), lines
  del lease


def test_a_workdir_the_lease_created_is_removed_when_left_empty(tmp_path):
  workdir = tmp_path / 'new'
  with lease_lib.WorkdirLease(str(workdir)):
    assert workdir.is_dir()
  assert not workdir.exists()
  with lease_lib.WorkdirLease(str(workdir)):
    (workdir / 'metrics.jsonl').write_text('{}')
  assert sorted(os.listdir(workdir)) == ['metrics.jsonl']


def test_disabled_leases_do_nothing(tmp_path):
  with lease_lib.WorkdirLease(str(tmp_path / 'w'), enabled=False):
    assert not (tmp_path / 'w').exists()
