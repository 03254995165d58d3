"""A population of N members against the same N runs started one after another.

  python benchmarks/population_speed.py --config=configs/byte_pool.py --members=8 --steps=300 \
      --data_path=../shared/data/corpus/wikipedia_en/shard_00.jsonl

Both sides run `main.py` as a user would, whole processes timed from start to exit (start-up,
data, compilation or the compile cache, training, checkpoints, export): N single runs with
seeds 0..N-1, then one run with `train.population=N`. Prints both wall times, their ratio,
and the largest difference between a member's training losses and its single run's (they
read the same data in the same order, so it is float32 rounding).
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]

_CONFIG = flags.DEFINE_string('config', 'configs/byte_pool.py', 'config file[:preset].')
_MEMBERS = flags.DEFINE_integer('members', 8, 'population size (and number of single runs).')
_STEPS = flags.DEFINE_integer('steps', 300, 'train steps of every run.')
_DATA_PATH = flags.DEFINE_string('data_path', '', 'local corpus (data.source=local); empty: the '
                                 'built-in corpus.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'where the runs go (default: a temporary folder).')
_EXTRA = flags.DEFINE_list('overrides', [], 'more --config.* overrides for every run, e.g. '
                           'train.log_every=50.')


def _run(workdir: pathlib.Path, *overrides: str) -> float:
  cmd = [sys.executable, 'main.py', f'--config={_CONFIG.value}', f'--workdir={workdir}',
         f'--config.train.steps={_STEPS.value}', *[f'--config.{o}' for o in _EXTRA.value],
         *overrides]
  if _DATA_PATH.value:
    cmd += ['--config.data.source=local', f'--config.data.path={_DATA_PATH.value}',
            f'--config.data.data_dir={workdir.parent / "tfds"}']
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  seconds = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(f'{" ".join(cmd)} failed:\n{proc.stderr[-4000:]}')
  return seconds


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['loss'] for r in rows if r['split'] == 'train'}


def main(argv):
  del argv
  root = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix='population_speed_'))
  root.mkdir(parents=True, exist_ok=True)
  n = _MEMBERS.value
  if _DATA_PATH.value:   # prepared once, outside both timings
    _run(root / 'prepare', '--config.train.steps=1', '--config.train.warmup_steps=0')
  single_s = [_run(root / f'single_{s}', f'--config.seed={s}') for s in range(n)]
  population_s = _run(root / 'population', f'--config.train.population={n}')
  diffs = []
  for s in range(n):
    member = next((root / 'population' / 'members').glob(f'm{s}_seed{s}*'))
    a, b = _losses(member), _losses(root / f'single_{s}')
    diffs += [abs(a[k] - b[k]) for k in a.keys() & b.keys()]
  print(f'config {_CONFIG.value}, {n} members, {_STEPS.value} steps, jax devices: '
        f'{os.environ.get("JAX_PLATFORMS", "default")}, workdir {root}')
  print(f'{n} single runs one after another: {sum(single_s):.1f} s '
        f'({", ".join(f"{x:.1f}" for x in single_s)})')
  print(f'one population of {n}:            {population_s:.1f} s')
  print(f'speed-up: {sum(single_s) / population_s:.2f}x; largest |member loss - single run '
        f'loss| over {len(diffs)} logged steps: {max(diffs):.2e}')


if __name__ == '__main__':
  app.run(main)
