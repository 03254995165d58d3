"""A population of N members against the same N runs started one after another.

  python benchmarks/population_speed.py --config=configs/byte_pool.py --members=8 --steps=300 \
      --data_path=../shared/data/corpus/wikipedia_en/shard_00.jsonl
  python benchmarks/population_speed.py --config=configs/byte_pool.py --members=8 --mode=steps

--mode=steps times train steps in this process, interleaved: one population step of N members
against N steps of the single run's step, on synthetic batches of the model's layout, --rounds
rounds after a compiling one; the ratio of medians holds on a shared, noisy machine.
`--vmap_sizes=0,1,2` times one population step per `train.population_vmap_size` in the same
rounds (members vmapped that many at a time, the groups in sequence; 0: all at once).

--mode=runs (the default): both sides run `main.py` as a user would, whole processes timed from start to exit (start-up,
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
_MODE = flags.DEFINE_enum('mode', 'runs', ['runs', 'steps'], 'whole processes, or train steps '
                          'interleaved in this process.')
_ROUNDS = flags.DEFINE_integer('rounds', 10, '--mode=steps: timed rounds.')
_VMAP_SIZES = flags.DEFINE_list('vmap_sizes', ['0'], '--mode=steps: train.population_vmap_size '
                                 'values, each its own population step in the same rounds.')
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


def _step_ratio() -> None:
  """--mode=steps: one population step against N single steps, interleaved."""
  # pylint: disable=g-import-not-at-top  (jax only for this mode: the runs mode forks main.py)
  import statistics
  import jax
  import numpy as np
  sys.path.insert(0, str(REPO))
  from stlm.config import files
  from stlm.models import factory
  from stlm.models import kinds
  from stlm.train import population
  from stlm.train import setup as setup_lib
  from stlm.train import sharding
  path, _, preset = _CONFIG.value.partition(':')
  config = files.load(str(REPO / path), preset or 'tiny')
  for o in _EXTRA.value:
    key, _, value = o.partition('=')
    section, name = key.rsplit('.', 1)
    node = config
    for part in section.split('.'):
      node = node[part]
    node[name] = type(node[name])(value)
  config.model.vocab_size = 50257 if config.tokenizer.kind == 'gpt2' else config.model.vocab_size
  n = _MEMBERS.value
  config.train.population = n
  members = population.members(config)
  mesh = sharding.make_mesh(config.mesh)
  kind = kinds.get_kind(config.model.kind)
  rng = np.random.default_rng(0)
  batches = [kind.synthetic_batch(config.model, rng, (config.train.grad_accum,
                                                      config.train.batch_size)) for _ in range(n)]
  single_cfg = members[0].config
  model = factory.build_model(single_cfg.model)
  single = setup_lib.build_train_step(single_cfg, model, mesh)
  pop_model = factory.build_model(population.shared_model_config(members))
  hp = population.hyperparameters(config, members)
  psteps = {}
  for size in _VMAP_SIZES.value:
    config.train.population_vmap_size = int(size)
    psteps[f'population (vmap_size {size})'] = population.build_population_step(
        config, members, pop_model, mesh)
  with sharding.mesh_context(mesh):
    single_state = single.init()
    pops = {name: [p.init(), jax.numpy.ones(n, bool)] for name, p in psteps.items()}
    placed = [sharding.global_batch(b, mesh, True) for b in batches]
    stacked = jax.device_put({k: np.stack([b[k] for b in batches]) for k in batches[0]},
                             next(iter(psteps.values())).batch_sharding)
    times = {'single': [], **{name: [] for name in psteps}}
    for r in range(_ROUNDS.value + 1):
      t0 = time.perf_counter()
      for b in placed:
        single_state, m = single.step(single_state, b)
      jax.block_until_ready(m)
      elapsed = {'single': time.perf_counter() - t0}
      for name, p in psteps.items():
        t0 = time.perf_counter()
        state, active = pops[name]
        state, m, active = p.step(state, stacked, hp, active)
        pops[name] = [state, active]
        jax.block_until_ready(m)
        elapsed[name] = time.perf_counter() - t0
      if r:   # round 0 compiles
        for name, t in elapsed.items():
          times[name].append(t)
  a = statistics.median(times['single'])
  print(f'config {_CONFIG.value} ({config.model.kind}), {n} members, {_ROUNDS.value} rounds, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s)')
  print(f'{n} single steps: {a * 1e3:.1f} ms')
  for name in psteps:
    b = statistics.median(times[name])
    print(f'one {name} step: {b * 1e3:.1f} ms; speed-up {a / b:.2f}x')


def main(argv):
  del argv
  if _MODE.value == 'steps':
    _step_ratio()
    return
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
