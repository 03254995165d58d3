"""Weights & Biases as an optional metrics writer beside metrics.jsonl and TensorBoard.

`train.wandb_project` switches it on ('' = off, the default; wandb is then never imported, so
stlm runs without the package). `MetricsWriter` (process 0 only) fans every scalar it writes
out to `WandbWriter.write`: the same `<split>/<key>` names at the same train step. The W&B
run's config is the run's full config plus, under `run`, its identity from run.json (name,
preset, kind, config file, git commit, host, command, workdir); its name is
`<config name>:<preset>`. Its files live in <workdir>/wandb/.

Mode: `train.wandb_mode='offline'` (the default) writes the run under <workdir>/wandb/ and
reaches no network; `wandb sync <workdir>/wandb/offline-run-*` uploads it later. `online`
streams it to the W&B server.

One W&B run per workdir: its id is generated once and kept in <workdir>/wandb_run_id, and every
start calls `wandb.init(id=<that id>, resume='allow')`. So the same command that resumes the
training resumes the same W&B run. An offline start adds one offline-run-<time>-<id>/ directory,
and syncing them all uploads them into that one run. Delete wandb_run_id to log a later start
as a new W&B run.

Steps on resume. W&B history only moves forward: wandb-core ignores a row logged at a step
below the run's current one ("Steps must be monotonically increasing, so this data will be
ignored"). Online, a resumed run starts at the server's last step + 1 (`run.starting_step`).
Consider a run that logged up to step k and was killed after its newest checkpoint s < k. It
resumes at s and logs steps s+1..k again. metrics.jsonl drops its old rows past s and
TensorBoard hides them (purge_step). W&B's counterpart, rewinding with `resume_from`, is
applied by the server at upload time and is not enabled on every account, so offline it
promises nothing. So this writer does not log rows at steps <= the last step W&B already holds
for this run. The earlier start's values stay for those steps. They came from the same
checkpoint and the same data order that the resumed run repeats, so they agree with
metrics.jsonl up to floating-point non-determinism. Each step then appears once, and the rows
of successive starts line up in order, whichever way they reach the server. The last step held
is the highest of two numbers. One is the highest history step in this run's transaction logs
under <workdir>/wandb/ (every start, online or offline, writes one: `read_history`). The other
is the server's, online. How many rows were skipped is printed once.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import string
import struct
import time
import zlib

from stlm.config import errors

RUN_ID_FILE = 'wandb_run_id'
WANDB_DIR = 'wandb'   # under the workdir; wandb.init(dir=workdir) creates it
_ID_ALPHABET = string.ascii_lowercase + string.digits   # what W&B's own generated ids use


def enabled(config) -> bool:
  return bool(config.train.get('wandb_project', ''))


def import_wandb(config):
  """The wandb module when `train.wandb_project` is set, else None; a missing or broken
  package is a ConfigError naming the key (raised before any work, by every process, so a
  multi-process run stops everywhere at once)."""
  if not enabled(config):
    return None
  try:
    import wandb  # pylint: disable=g-import-not-at-top  (optional dependency)
  except Exception as e:  # pylint: disable=broad-except  (a broken install fails in many ways)
    errors.fail('train.wandb_project', config.train.wandb_project,
                f'needs the wandb package (pip install wandb==0.31.0); importing it failed: '
                f'{type(e).__name__}: {e}')
  return wandb


def stable_run_id(workdir: str) -> str:
  """The workdir's W&B run id: read from <workdir>/wandb_run_id, created there on first use."""
  path = os.path.join(workdir, RUN_ID_FILE)
  try:
    with open(path, encoding='ascii') as f:
      run_id = f.read().strip()
    if run_id:
      return run_id
  except FileNotFoundError:
    pass
  run_id = ''.join(secrets.choice(_ID_ALPHABET) for _ in range(8))
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='ascii') as f:   # temporary name + rename: never half an id
    f.write(run_id + '\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return run_id


# The transaction log (<run dir>/run-<id>.wandb) is LevelDB's log format: a 7-byte file header
# (':W&B', magic 0xBEE1, version 0), then 32 KiB blocks of records, each a 7-byte header
# (CRC-32 of type + payload, payload length, type) and a payload; a record that does not fit
# in a block's rest is split into FIRST, MIDDLE.., LAST pieces. Payloads are wandb's
# protobuf `Record`s. This version of wandb ships no Python reader of it.
_FILE_HEADER = struct.Struct('<4sHB')
_RECORD_HEADER = struct.Struct('<IHB')
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
  """The record payloads of a transaction log, up to the first damaged or cut-off record (a
  killed run's last write)."""
  if len(data) < _FILE_HEADER.size:
    return
  ident, magic, _ = _FILE_HEADER.unpack_from(data)
  if ident != b':W&B' or magic != 0xBEE1:
    raise ValueError('not a W&B transaction log')
  pos, pieces = _FILE_HEADER.size, None
  while pos + _RECORD_HEADER.size <= len(data):
    block_left = _BLOCK - pos % _BLOCK
    if block_left < _RECORD_HEADER.size:   # the block's zero-filled tail
      pos += block_left
      continue
    crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
    if kind == 0 and length == 0:          # zero padding: the rest of the block is empty
      pos += block_left
      continue
    payload = data[pos + _RECORD_HEADER.size:pos + _RECORD_HEADER.size + length]
    if len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
      return
    pos += _RECORD_HEADER.size + length
    if kind == _FULL:
      yield payload
    elif kind == _FIRST:
      pieces = [payload]
    elif kind == _MIDDLE and pieces is not None:
      pieces.append(payload)
    elif kind == _LAST and pieces is not None:
      yield b''.join(pieces + [payload])
      pieces = None
    else:
      return


def read_records(path: str):
  """wandb's protobuf Records in one transaction log (needs the wandb package)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  for payload in _payloads(data):
    record = wandb_internal_pb2.Record()
    record.ParseFromString(payload)
    yield record


def read_history(path: str) -> list[dict]:
  """The history rows of one transaction log, in order: {'_step': int, name: float, ...}."""
  rows = []
  for record in read_records(path):
    if record.WhichOneof('record_type') != 'history':
      continue
    row = {'_step': int(record.history.step.num)}
    for item in record.history.item:
      row[item.key or '/'.join(item.nested_key)] = json.loads(item.value_json)
    rows.append(row)
  return rows


def transaction_logs(workdir: str, run_id: str) -> list[str]:
  """This run's transaction logs under <workdir>/wandb/, oldest start first (by directory name:
  [offline-]run-<YYYYmmdd_HHMMSS>-<id>)."""
  paths = glob.glob(os.path.join(workdir, WANDB_DIR, f'*run-*-{run_id}', f'run-{run_id}.wandb'))
  return sorted(paths, key=lambda p: os.path.basename(os.path.dirname(p)).split('run-', 1)[1])


def last_logged_step(workdir: str, run_id: str) -> int:
  """The highest history step any earlier start wrote for this run under workdir (-1: none)."""
  last = -1
  for path in transaction_logs(workdir, run_id):
    try:
      steps = [row['_step'] for row in read_history(path)]
    except (OSError, ValueError):   # unreadable: count what the other starts hold
      continue
    last = max([last, *steps])
  return last


def wait_for_a_new_start_second(workdir: str, run_id: str) -> None:
  """Returns once the clock has passed the second the newest earlier start began in.

  wandb names a start's directory [offline-]run-<YYYYmmdd_HHMMSS>-<id>, to the second: a
  second start of the same run within that second would reuse the first one's directory and
  overwrite its transaction log (and with it the steps it holds). The directory's mtime is at
  or after the second in its name, so waiting past it is enough; it costs at most a second.
  """
  logs = transaction_logs(workdir, run_id)
  if not logs:
    return
  newest = max(os.stat(os.path.dirname(p)).st_mtime for p in logs)
  while int(time.time()) <= int(newest):
    time.sleep(0.05)


class WandbWriter:
  """One start's W&B run (process 0 only: MetricsWriter creates it there)."""

  def __init__(self, wandb, workdir: str, config, identity: dict | None = None, log=print):
    self._log = log
    self.run_id = stable_run_id(workdir)
    # Before init: this start's own transaction log is empty and must not count.
    already_held = last_logged_step(workdir, self.run_id)
    wait_for_a_new_start_second(workdir, self.run_id)
    t = config.train
    try:
      self.run = wandb.init(
          project=t.wandb_project, entity=t.wandb_entity or None, mode=t.wandb_mode,
          dir=workdir, id=self.run_id, resume='allow', name=f'{config.name}:{config.preset}',
          config={**config.to_dict(), 'run': dict(identity or {})},
          tags=[config.name, config.preset, config.model.kind])
    except wandb.errors.Error as e:   # e.g. online with no API key: one line, not a traceback
      errors.fail('train.wandb_project', t.wandb_project,
                  f'wandb.init (mode {t.wandb_mode}) failed: {e}')
    # Online, the server's history ends at starting_step - 1 (0 when it has none).
    self.skip_through = max(already_held, int(self.run.starting_step) - 1)
    self.skipped = 0
    self._closed = False

  def write(self, step: int, split: str, values: dict) -> None:
    """Logs `<split>/<key>` at `step`; a step W&B already holds is not logged (see above)."""
    if step <= self.skip_through:
      if not self.skipped:
        self._log(f'W&B run {self.run_id} already holds steps up to {self.skip_through}; '
                  'not logging them again (their earlier values stay)')
      self.skipped += 1
      return
    # Several calls at one step (train, then validation) become one history row.
    self.run.log({f'{split}/{k}': v for k, v in values.items()}, step=step)

  def close(self, failed: bool = False) -> None:
    """Finishes the W&B run (uploads the rest, online); failed marks it crashed in W&B."""
    if self._closed:
      return
    self._closed = True
    self.run.finish(exit_code=1 if failed else 0)
