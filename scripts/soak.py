"""Fault-injection soak: train while being killed (SIGKILL, SIGTERM, mid-save), then compare.

Trains a very small `tiny` baseline for --steps steps in a fresh workdir, killing it --kills
times at random moments (a random logged step plus a random delay, or the moment an Orbax
temporary save directory appears, i.e. during a checkpoint save) and restarting it each time,
then checks against an uninterrupted run of the same config that

  * every logged train loss and validation loss is identical (exact float equality),
  * every step appears exactly once in metrics.jsonl,
  * the exported parameters are bit-identical,
  * after every kill, each checkpoint directory passes the integrity check (a kill mid-save
    never leaves a complete-looking checkpoint), and SIGTERM exits 0 with its stop line.

  python scripts/soak.py --root=/tmp/soak --kills=20 --steps=60

Prints the kills survived. A failed check exits non-zero naming the difference.
"""

import argparse
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


def env():
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')


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


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--root', default='/tmp/stlm_soak')
  p.add_argument('--kills', type=int, default=20)
  p.add_argument('--steps', type=int, default=60)
  p.add_argument('--ckpt_every', type=int, default=3)
  p.add_argument('--eval_every', type=int, default=10)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args()
  rng = random.Random(args.seed)
  ref_dir, soak_dir = os.path.join(args.root, 'reference'), os.path.join(args.root, 'soak')
  shutil.rmtree(soak_dir, ignore_errors=True)
  for old in glob.glob(os.path.join(args.root, 'start_*.log')):
    os.remove(old)
  t0 = time.time()
  ref_flags = os.path.join(args.root, 'reference_flags.json')
  same_ref = os.path.isdir(os.path.join(ref_dir, 'export')) and os.path.exists(ref_flags) and \
      json.load(open(ref_flags, encoding='utf-8')) == flags(args, ref_dir)
  if same_ref:   # an uninterrupted run of this exact command is already there
    print(f'reference run: reusing {ref_dir}', flush=True)
  else:
    shutil.rmtree(ref_dir, ignore_errors=True)
    subprocess.run([sys.executable, 'main.py', *flags(args, ref_dir)], cwd=REPO, env=env(),
                   check=True, capture_output=True)
    with open(ref_flags, 'w', encoding='utf-8') as f:
      json.dump(flags(args, ref_dir), f)
    print(f'reference run: {args.steps} steps in {time.time() - t0:.0f} s', flush=True)

  kills = {'SIGKILL': 0, 'SIGTERM': 0, 'during save': 0}
  starts, partial_seen = 0, 0
  while True:
    starts += 1
    log = open(os.path.join(args.root, f'start_{starts}.log'), 'w', encoding='utf-8')
    # Unbuffered, so the start-up line shows in the log when it is printed.
    proc = subprocess.Popen([sys.executable, 'main.py', *flags(args, soak_dir)], cwd=REPO,
                            env=env(), stdout=log, stderr=subprocess.STDOUT)
    done = sum(v for k, v in kills.items() if k != 'during save')
    killed = None
    if done < args.kills:
      sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
      mode = rng.choice(['step', 'step', 'save'])   # a third aim at a save in progress
      begin = last_train_step(soak_dir)
      target = begin + rng.randint(1, max(1, min(4, args.steps - begin - 1)))
      delay = rng.uniform(0.0, 0.3)
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
          if proc.poll() is None:
            proc.send_signal(sig)
            killed = signal.Signals(sig).name
            kills[killed] += 1
            kills['during save'] += in_save
          break
        time.sleep(0.01)
    rc = proc.wait()
    log.close()
    text = open(log.name, encoding='utf-8').read()
    n_ckpts, n_partial = check_checkpoints(soak_dir)
    partial_seen += n_partial > 0
    if killed == 'SIGTERM' and rc == 0 and 'stopped after step' not in text \
        and 'exported params' not in text:
      raise SystemExit(f'soak FAILED: SIGTERM exit 0 without a stop line ({log.name})')
    if killed == 'SIGTERM' and rc != 0 and 'metrics: ' in text:
      raise SystemExit(f'soak FAILED: SIGTERM gave exit {rc} ({log.name})')
    if killed is None and rc != 0:
      raise SystemExit(f'soak FAILED: unkilled start exited {rc} ({log.name})')
    print(f'start {starts}: {killed or "not killed"}, exit {rc}, at step '
          f'{last_train_step(soak_dir)}, {n_ckpts} intact checkpoint(s)'
          + (f', {n_partial} half-deleted old one(s)' if n_partial else ''), flush=True)
    if killed is None and rc == 0 and os.path.isdir(os.path.join(soak_dir, 'export')):
      break
  logged = compare(ref_dir, soak_dir)
  total = kills['SIGKILL'] + kills['SIGTERM']
  print(f'soak: survived {total} kills ({kills["SIGKILL"]} SIGKILL, {kills["SIGTERM"]} SIGTERM; '
        f'{kills["during save"]} while a checkpoint save was in progress; {partial_seen} left a '
        f'half-deleted old checkpoint, never restored) over {starts} starts and {args.steps} '
        f'steps; all {logged} logged train losses, every validation loss and '
        f'the exported parameters equal the uninterrupted run ({time.time() - t0:.0f} s).')


if __name__ == '__main__':
  main()
