"""Fault-injection soak: train through faults (SIGKILL, SIGTERM, a second start, a full disk),
then compare with an uninterrupted run.

Trains a very small `tiny` baseline for --steps steps in a fresh workdir and injects --faults
faults, each of a kind drawn from --kinds, at random moments (a random logged step plus a
random delay, or the moment an Orbax temporary save directory appears, i.e. during a
checkpoint save):
  * sigkill / sigterm: the signal to the run, which is then started again;
  * second_start: the same command started again while the run trains (paused, so that it
    cannot finish first); it must be refused in one `error:` line (the workdir lease) and the
    run goes on;
  * disk_full: the workdir lives on a small tmpfs (needs root), which a filler file fills to
    64 KB; the run must stop in one `error:` line (no room for the next checkpoint, or a save
    that failed), the filler is removed and the run started again.
Then it checks against an uninterrupted run of the same config that

  * every logged train loss and validation loss is identical (exact float equality),
  * every step appears exactly once in metrics.jsonl,
  * the exported parameters are bit-identical,
  * after every kill, each checkpoint directory passes the integrity check (a kill mid-save
    never leaves a complete-looking checkpoint), and SIGTERM exits 0 with its stop line.

  python scripts/soak.py --root=/tmp/soak --faults=20 --steps=60 \
      --kinds=sigkill,sigterm,second_start,disk_full

Prints the faults survived. A failed check exits non-zero naming the difference.
"""

import argparse
import errno
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SMALL = ['--config=configs/baseline.py', '--config.tokenizer.kind=bytes',
         '--config.model.num_layers=1', '--config.model.hidden_dim=32',
         '--config.model.num_heads=2', '--config.model.num_kv_heads=1',
         '--config.model.ffn_dim=64', '--config.model.max_len=32',
         '--config.train.batch_size=2', '--config.train.warmup_steps=2',
         '--config.train.log_every=1', '--config.train.eval_batches=1',
         '--config.train.keep_checkpoints=2']


def flags(args, workdir):
  return [*SMALL, f'--workdir={workdir}', f'--config.train.steps={args.steps}',
          f'--config.train.ckpt_every={args.ckpt_every}',
          f'--config.train.eval_every={args.eval_every}',
          f'--config.data.data_dir={os.path.join(args.root, "tfds")}']


HEARTBEAT_S = 10   # --processes=2: how soon the others notice a killed process


def write_corpus(path):
  """Short documents, one file each, with an even number held out (--processes=2 splits the
  corpus by file, and both processes need as many validation batches)."""
  from stlm.data import corpus  # pylint: disable=g-import-not-at-top
  words = 'the a tiny model reads bytes and learns which one comes next in every line'.split()
  rnd = random.Random(0)
  n = 60
  while True:
    docs = [(f'd{i:02d}.txt', f'doc {i:02d}: ' + ' '.join(rnd.choice(words) for _ in range(12)))
            for i in range(n)]
    if len(corpus.split_documents(docs, 0.2)['validation']) % 2 == 0:
      break
    n += 1
  os.makedirs(path, exist_ok=True)
  for name, text in docs:
    with open(os.path.join(path, name), 'w', encoding='utf-8') as f:
      f.write(text)


def process_flags(args, workdir, port, process_id):
  """One of two processes of a run on localhost (2 CPU devices each, mesh data x fsdp 2 x 2)."""
  corpus_dir = os.path.join(args.root, 'corpus')
  return [*flags(args, workdir), f'--coordinator_address=localhost:{port}', '--num_processes=2',
          f'--process_id={process_id}', f'--heartbeat_timeout={HEARTBEAT_S}',
          '--config.data.source=local', f'--config.data.path={corpus_dir}',
          '--config.data.split_by=file', '--config.data.val_fraction=0.2',
          '--config.train.batch_size=8', '--config.mesh.shape=(-1,2,1)']


def free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def env(processes=1):
  out = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  if processes > 1:
    out['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  return out


def rows(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass   # a line being written right now
  return out


def last_train_step(workdir):
  return max((r['step'] for r in rows(workdir) if r['split'] == 'train'), default=0)


def saving(workdir):
  return bool(glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*')))


def training(log_path):
  with open(log_path, encoding='utf-8') as f:
    return 'metrics: ' in f.read()


def check_checkpoints(workdir):
  """(intact, partial): the newest step directory must pass the integrity check.

  Older ones may be half deleted: Orbax removes checkpoints beyond keep_checkpoints with a
  non-atomic rmtree, so a kill during that leaves a partial old directory. It lacks Orbax's
  _CHECKPOINT_METADATA or files of the manifest, so verify_files flags it; resumption never
  picks it while a newer intact one exists, and Orbax deletes it at its next clean-up.
  """
  from stlm.train import checkpoint  # pylint: disable=g-import-not-at-top
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return 0, 0
  steps = sorted((int(d) for d in os.listdir(root) if d.isdigit()), reverse=True)
  intact = 0
  for i, step in enumerate(steps):
    try:
      checkpoint.verify_files(step, os.path.join(root, str(step)))
      intact += 1
    except checkpoint.DamagedCheckpointError:
      if i == 0:
        raise   # the checkpoint a restart would restore
  return intact, len(steps) - intact


def load_params(export_dir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(export_dir, 'params'))


def compare(ref_dir, soak_dir):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  ref, got = rows(ref_dir), rows(soak_dir)
  for split, key in (('train', 'loss'), ('validation', 'loss')):
    a = [(r['step'], r[key]) for r in ref if r['split'] == split]
    b = [(r['step'], r[key]) for r in got if r['split'] == split]
    if [s for s, _ in b] != sorted(set(s for s, _ in b)):
      raise SystemExit(f'soak FAILED: {split} steps not each logged once: {[s for s, _ in b]}')
    if a != b:
      diff = [(x, y) for x, y in zip(a, b) if x != y][:5]
      raise SystemExit(f'soak FAILED: {split} {key} differs from the uninterrupted run: {diff}')
  pa, pb = load_params(os.path.join(ref_dir, 'export')), load_params(
      os.path.join(soak_dir, 'export'))
  same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), pa, pb)
  if not all(jax.tree.leaves(same)):
    raise SystemExit('soak FAILED: exported parameters differ from the uninterrupted run')
  return len([r for r in got if r['split'] == 'train'])


KINDS = ('sigkill', 'sigterm', 'second_start', 'disk_full')
SIGNALS = {'sigkill': signal.SIGKILL, 'sigterm': signal.SIGTERM}
DISK_MB = 64        # the tmpfs the soak run's workdir lives on, with --kinds=...disk_full
DISK_LEFT = 64 << 10   # bytes a disk fault leaves free: the next save cannot fit


def one_line_error(text, what):
  """The `error: ...` line of a refused or stopped start; SystemExit if there is a traceback."""
  if 'Traceback' in text:
    raise SystemExit(f'soak FAILED: {what} printed a traceback:\n{text[-3000:]}')
  lines = [l for l in text.splitlines() if l.startswith('error: ')]
  if len(lines) != 1:
    raise SystemExit(f'soak FAILED: {what} did not end with one error line:\n{text[-3000:]}')
  return lines[0]


def second_start(args, soak_dir, running):
  """Starts the same command again while the run trains: it must be refused in one line.

  The running process is paused meanwhile (SIGSTOP, then SIGCONT), so that a run this small
  cannot finish during the second one's start-up: it still holds its lease, mid-run.
  """
  running.send_signal(signal.SIGSTOP)
  try:
    proc = subprocess.run([sys.executable, 'main.py', *flags(args, soak_dir)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=300)
  finally:
    running.send_signal(signal.SIGCONT)
  line = one_line_error(proc.stdout + proc.stderr, 'a second start')
  if proc.returncode == 0 or 'in use by another run' not in line:
    raise SystemExit(f'soak FAILED: a second start was not refused (exit {proc.returncode}): '
                     f'{line}')


def fill_disk(soak_dir):
  """Fills the workdir's filesystem but DISK_LEFT bytes; returns the filler's path."""
  filler = os.path.join(os.path.dirname(soak_dir), 'filler')
  block = b'\0' * (256 << 10)
  with open(filler, 'wb', buffering=0) as f:
    try:
      while True:
        f.write(block)
    except OSError as e:
      if e.errno != errno.ENOSPC:
        raise
    f.truncate(max(f.tell() - DISK_LEFT, 0))
  return filler


def mount_small_disk(soak_dir):
  """A DISK_MB tmpfs holding the soak run's workdir (the filler sits beside it)."""
  if os.geteuid() != 0:
    raise SystemExit('--kinds with disk_full needs root, to mount a small tmpfs')
  disk_root = soak_dir + '.disk'
  os.makedirs(disk_root, exist_ok=True)
  if os.path.ismount(disk_root):   # left by an interrupted soak
    subprocess.run(['umount', disk_root], check=True)
  subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={DISK_MB}m', 'tmpfs', disk_root],
                 check=True)
  return disk_root


def new_counts():
  """Faults injected by kind, those during a save, starts with a half-deleted old checkpoint,
  and starts."""
  return {**dict.fromkeys(KINDS, 0), 'during save': 0, 'partial': 0, 'starts': 0}


def start_processes(args, workdir, log_name):
  """The run's two processes, their output in log_name.<process id>."""
  port = free_port()
  logs = [open(f'{log_name}.{i}', 'w', encoding='utf-8') for i in range(2)]
  procs = [subprocess.Popen([sys.executable, 'main.py', *process_flags(args, workdir, port, i)],
                            cwd=REPO, env=env(2), stdout=logs[i], stderr=subprocess.STDOUT)
           for i in range(2)]
  return procs, logs


def soak_processes(args, rng, soak_dir):
  """--processes=2: SIGTERM or SIGKILL to one of the two processes, --faults times."""
  counts = new_counts()
  while True:
    counts['starts'] += 1
    log_name = os.path.join(args.root, f'start_{counts["starts"]}.log')
    procs, logs = start_processes(args, soak_dir, log_name)
    event, kind, victim = 'no fault', None, None
    if sum(counts[k] for k in KINDS) < args.faults:
      kind, victim = rng.choice(['sigterm', 'sigkill']), rng.randrange(2)
      begin = last_train_step(soak_dir)
      target = begin + rng.randint(1, max(1, min(4, args.steps - begin - 1)))
      while all(p.poll() is None for p in procs):
        if training(logs[0].name) and last_train_step(soak_dir) >= target:
          time.sleep(rng.uniform(0.0, 0.3))
          in_save = saving(soak_dir)
          procs[victim].send_signal(SIGNALS[kind])
          sent = time.time()
          counts[kind] += 1
          counts['during save'] += in_save
          event = f'{kind} to process {victim}' + (' (during a save)' if in_save else '')
          break
        time.sleep(0.01)
      else:
        kind = None
    try:
      rcs = [p.wait(timeout=HEARTBEAT_S + 120) for p in procs]
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise SystemExit(f'soak FAILED: a process still runs {HEARTBEAT_S + 120} s after '
                       f'{event} ({log_name}.*)')
    for f in logs:
      f.close()
    texts = [open(f.name, encoding='utf-8').read() for f in logs]
    n_ckpts, n_partial = check_checkpoints(soak_dir)
    counts['partial'] += n_partial > 0
    if kind == 'sigterm':
      stops = [t for t in texts if 'stopped after step' in t]
      if rcs != [0, 0] or not stops and 'exported params' not in texts[0]:
        raise SystemExit(f'soak FAILED: SIGTERM to one process gave exits {rcs} ({log_name}.*)')
    elif kind == 'sigkill':
      other = 1 - victim
      if rcs[other] == 0 and 'exported params' not in texts[0]:
        raise SystemExit(f'soak FAILED: the process beside a killed one exited 0 ({log_name}.*)')
      event += f'; the other exited {rcs[other]} after {time.time() - sent:.0f} s'
    elif rcs != [0, 0]:
      raise SystemExit(f'soak FAILED: a start without a fault gave exits {rcs} ({log_name}.*)')
    print(f'start {counts["starts"]}: {event}, exits {rcs}, at step {last_train_step(soak_dir)}, '
          f'{n_ckpts} intact checkpoint(s)', flush=True)
    if rcs == [0, 0] and os.path.isdir(os.path.join(soak_dir, 'export')) and \
        last_train_step(soak_dir) == args.steps:
      return counts


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--root', default='/tmp/stlm_soak')
  p.add_argument('--faults', type=int, default=20)
  p.add_argument('--kinds', default='sigkill,sigterm',
                 help=f'comma list of fault kinds, drawn at random: {", ".join(KINDS)}')
  p.add_argument('--steps', type=int, default=60)
  p.add_argument('--ckpt_every', type=int, default=3)
  p.add_argument('--eval_every', type=int, default=10)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--processes', type=int, default=1, choices=(1, 2),
                 help='2: a run of two processes (jax.distributed on localhost); faults are '
                 'SIGTERM or SIGKILL to one of them')
  args = p.parse_args()
  kinds = args.kinds.split(',')
  if not kinds or any(k not in KINDS for k in kinds):
    raise SystemExit(f'--kinds={args.kinds}: choose from {", ".join(KINDS)}')
  if args.processes > 1 and set(kinds) - set(SIGNALS):
    raise SystemExit(f'--processes={args.processes} injects {", ".join(SIGNALS)} only')
  rng = random.Random(args.seed)
  ref_dir = os.path.join(args.root, 'reference')
  disk_root = None
  soak_dir = os.path.join(args.root, 'soak')
  shutil.rmtree(soak_dir, ignore_errors=True)
  if 'disk_full' in kinds:
    disk_root = mount_small_disk(soak_dir)
    soak_dir = os.path.join(disk_root, 'soak')
  for old in glob.glob(os.path.join(args.root, 'start_*.log')):
    os.remove(old)
  t0 = time.time()
  ref_flags = os.path.join(args.root, 'reference_flags.json')
  ref_key = [*flags(args, ref_dir), f'--processes={args.processes}']
  same_ref = os.path.isdir(os.path.join(ref_dir, 'export')) and os.path.exists(ref_flags) and \
      json.load(open(ref_flags, encoding='utf-8')) == ref_key
  if args.processes > 1:
    write_corpus(os.path.join(args.root, 'corpus'))
  if same_ref:   # an uninterrupted run of this exact command is already there
    print(f'reference run: reusing {ref_dir}', flush=True)
  else:
    shutil.rmtree(ref_dir, ignore_errors=True)
    if args.processes > 1:
      procs, logs = start_processes(args, ref_dir, os.path.join(args.root, 'reference.log'))
      if [p.wait() for p in procs] != [0, 0]:
        raise SystemExit(f'the reference run failed: {logs[0].name}')
    else:
      subprocess.run([sys.executable, 'main.py', *flags(args, ref_dir)], cwd=REPO, env=env(),
                     check=True, capture_output=True)
    with open(ref_flags, 'w', encoding='utf-8') as f:
      json.dump(ref_key, f)
    print(f'reference run: {args.steps} steps in {time.time() - t0:.0f} s', flush=True)

  try:
    counts = (soak_processes(args, rng, soak_dir) if args.processes > 1 else
              soak(args, kinds, rng, soak_dir))
    logged = compare(ref_dir, soak_dir)   # before a tmpfs workdir goes
  finally:
    if disk_root:
      subprocess.run(['umount', disk_root], check=False)
  total = sum(counts[k] for k in KINDS)
  print(f'soak: survived {total} faults ({", ".join(f"{counts[k]} {k}" for k in kinds)}; '
        f'{counts["during save"]} while a checkpoint save was in progress; '
        f'{counts["partial"]} left a half-deleted old checkpoint, never restored) over '
        f'{counts["starts"]} starts and {args.steps} steps; all {logged} logged train losses, '
        f'every validation loss and the exported parameters equal the uninterrupted run '
        f'({time.time() - t0:.0f} s).')


def soak(args, kinds, rng, soak_dir):
  """Starts the run until it finishes, injecting --faults faults; returns the counts."""
  counts = new_counts()
  while True:
    counts['starts'] += 1
    starts = counts['starts']
    log = open(os.path.join(args.root, f'start_{starts}.log'), 'w', encoding='utf-8')
    # Unbuffered, so the start-up line shows in the log when it is printed.
    proc = subprocess.Popen([sys.executable, 'main.py', *flags(args, soak_dir)], cwd=REPO,
                            env=env(), stdout=log, stderr=subprocess.STDOUT)
    try:
      ended_by, events, filler = inject(args, kinds, rng, soak_dir, proc, log, counts)
    except BaseException:
      proc.kill()
      raise
    rc = proc.wait()
    log.close()
    if filler:
      os.remove(filler)
    text = open(log.name, encoding='utf-8').read()
    n_ckpts, n_partial = check_checkpoints(soak_dir)
    counts['partial'] += n_partial > 0
    if ended_by == 'sigterm' and rc == 0 and 'stopped after step' not in text \
        and 'exported params' not in text:
      raise SystemExit(f'soak FAILED: SIGTERM exit 0 without a stop line ({log.name})')
    if ended_by == 'sigterm' and rc != 0 and 'metrics: ' in text:
      raise SystemExit(f'soak FAILED: SIGTERM gave exit {rc} ({log.name})')
    if ended_by == 'disk_full' and rc != 0:
      events[-1] += ': ' + one_line_error(text, f'a disk fault ({log.name})')[:90]
    if ended_by in (None, 'second_start') and rc != 0:
      raise SystemExit(f'soak FAILED: a start that was not stopped exited {rc} ({log.name})')
    print(f'start {starts}: {", ".join(events) or "no fault"}, exit {rc}, at step '
          f'{last_train_step(soak_dir)}, {n_ckpts} intact checkpoint(s)'
          + (f', {n_partial} half-deleted old one(s)' if n_partial else ''), flush=True)
    if rc == 0 and os.path.isdir(os.path.join(soak_dir, 'export')) and \
        last_train_step(soak_dir) == args.steps:
      return counts


def inject(args, kinds, rng, soak_dir, proc, log, counts):
  """Faults into the running start until one ends it or --faults are spent:
  (the kind that ends it or None, the faults injected, the disk filler or None)."""
  ended_by, events, filler = None, [], None
  while sum(counts[k] for k in KINDS) < args.faults and ended_by is None:
    kind = rng.choice(kinds)
    mode = rng.choice(['step', 'step', 'save'])   # a third aim at a save in progress
    begin = last_train_step(soak_dir)
    target = begin + rng.randint(1, max(1, min(4, args.steps - begin - 1)))
    delay = rng.uniform(0.0, 0.3)
    fired = False
    while proc.poll() is None:
      # Aim only once training runs (a signal during start-up just ends the process, and
      # the temporary directory of a save killed last time is removed at start-up).
      if not training(log.name):
        time.sleep(0.01)
        continue
      if (mode == 'save' and saving(soak_dir)) or (
          mode == 'step' and last_train_step(soak_dir) >= target):
        if mode == 'step':
          time.sleep(delay)
        in_save = saving(soak_dir)
        if proc.poll() is not None:
          break
        if kind in SIGNALS:
          proc.send_signal(SIGNALS[kind])
          ended_by = kind
        elif kind == 'disk_full':
          filler = fill_disk(soak_dir)
          ended_by = kind
        else:
          second_start(args, soak_dir, proc)
        counts[kind] += 1
        counts['during save'] += in_save
        events.append(kind + (' (during a save)' if in_save else ''))
        fired = True
        break
      time.sleep(0.01)
    if not fired:
      break   # the run ended before the fault
  return ended_by, events, filler


if __name__ == '__main__':
  main()
