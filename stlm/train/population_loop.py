"""The training loop of a population (stlm/train/population.py): one step, N member runs.

`main.py` comes here when `train.population` or `train.population_seeds` is set. The
population's workdir holds its lease, the prepared tokenizer, `population.json` (members,
their status and final validation) and `members/<name>/`, each member's own run directory:
metrics.jsonl, TensorBoard (and W&B), run.json, checkpoints and export, written as a single
run writes them. Running the same command again resumes every member from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from stlm import export as export_lib
from stlm.config import errors
from stlm.config import validate as config_validate
from stlm.data import pipeline
from stlm.data import tfds_builders
from stlm.models import factory
from stlm.models import kinds
from stlm.train import checkpoint
from stlm.train import compile_cache
from stlm.train import divergence
from stlm.train import lease as lease_lib
from stlm.train import loop
from stlm.train import metrics as metrics_lib
from stlm.train import population
from stlm.train import preemption
from stlm.train import run_info
from stlm.train import sharding
from stlm.train import step as step_lib

SUMMARY_FILE = 'population.json'


def train(config: ml_collections.ConfigDict, workdir: str,
          config_path: str | None = None) -> dict:
  """Trains (or resumes) every member; returns {member name: its final validation}."""
  workdir = os.path.abspath(workdir)
  loop.check_workdir(workdir)
  if jax.process_count() > 1:
    errors.fail('train.population', config.train.population,
                f'a population runs in one process ({jax.process_count()} were started); '
                'its members share that process\'s devices')
  lease = lease_lib.WorkdirLease(workdir, stale_s=config.train.lease_stale_s,
                                 log=lambda line: print(line, file=sys.stderr))
  with lease:
    return _train(config, workdir, config_path)


def _member_batch(iters, grad_accum: int, own: bool):
  """[N, micro, B, ...] from each member's iterator, or [micro, B, ...] from the shared one."""
  if not own:
    return loop._stack([next(iters[0]) for _ in range(grad_accum)])  # pylint: disable=protected-access
  per = [loop._stack([next(it) for _ in range(grad_accum)]) for it in iters]  # pylint: disable=protected-access
  return {k: np.stack([p[k] for p in per]) for k in per[0]}


def _write_summary(workdir: str, members, status: list[str], finals: list) -> None:
  out = dict(members=[dict(name=m.name, seed=int(m.config.seed), status=s, final_validation=f,
                           directory=os.path.join(population.MEMBERS_DIR, m.name),
                           overrides={k: m.config[k.split('.')[0]][k.split('.')[1]]
                                      for k in population.OVERRIDES})
                      for m, s, f in zip(members, status, finals)])
  tmp = os.path.join(workdir, SUMMARY_FILE + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(out, f, indent=2)
  os.replace(tmp, os.path.join(workdir, SUMMARY_FILE))


def _read_summary(workdir: str) -> dict:
  try:
    with open(os.path.join(workdir, SUMMARY_FILE), encoding='utf-8') as f:
      return {m['name']: m for m in json.load(f)['members']}
  except (OSError, ValueError, KeyError):
    return {}


def _train(config, workdir: str, config_path) -> dict:  # pylint: disable=too-many-locals,too-many-statements
  config = ml_collections.ConfigDict(config.to_dict())
  config_validate.validate(config)
  members = population.members(config)
  compile_cache.enable(config.train.get('compile_cache_dir', ''))
  loop._prepare_data(config)  # pylint: disable=protected-access
  tokenizer = loop.build_run_tokenizer(config, workdir)
  for c in [config] + [m.config for m in members]:
    c.model.vocab_size = tokenizer.vocab_size
    c.tokenizer.sp_model_path = config.tokenizer.sp_model_path
    config_validate.validate(c)
  try:
    mesh = sharding.make_mesh(config.mesh)
    population.check_mesh(config, len(members), mesh)
  except ValueError as e:
    raise config_validate.ConfigError(str(e)) from None
  model = factory.build_model(population.shared_model_config(members))
  featurizer = factory.make_featurizer(config, tokenizer)
  own = config.train.population_data == 'own'
  feeds = members if own else members[:1]
  iters = [pipeline.make_train_iter(m.config, featurizer, 'train') for m in feeds]
  corpus = tfds_builders.fingerprint(config.data)
  dirs = [os.path.join(workdir, population.MEMBERS_DIR, m.name) for m in members]
  ckpts = [checkpoint.RunCheckpoints(d, m.config, keep=config.train.keep_checkpoints,
                                     corpus=corpus) for d, m in zip(dirs, members)]
  for d, m, c in zip(dirs, members, ckpts):
    c.check_config()
    loop._check_export_is_ours(d, m.config)  # pylint: disable=protected-access
  recorders = [run_info.RunRecorder(d, m.config, config_path) for d, m in zip(dirs, members)]
  pstep = population.build_population_step(config, members, model, mesh)
  hp = population.hyperparameters(config, members)
  n, steps = len(members), int(config.train.steps)
  previous = _read_summary(workdir)
  status = [previous.get(m.name, {}).get('status', 'running') for m in members]
  # A diverged member stays stopped; every other one goes on (to more steps, if raised).
  status = ['diverged' if s == 'diverged' else 'running' for s in status]
  finals = [previous.get(m.name, {}).get('final_validation') for m in members]
  eval_fn = jax.jit(lambda p, b: step_lib.eval_step(p, b, model=model))
  bpb = kinds.get_kind(config.model.kind).reports_bits_per_byte

  # The validation batches are the same for every member (read in order, not by seed): with
  # a bounded eval_batches they are read once and kept, not once per member and evaluation.
  kept_eval = None
  if config.train.eval_batches:
    it = pipeline.make_eval_iter(config, featurizer, 'validation')
    kept_eval = [b for _, b in zip(range(int(config.train.eval_batches)), it)]

  def member_eval(state, i):
    params = pstep.unstack(state, i).params
    batches = kept_eval if kept_eval is not None else pipeline.make_eval_iter(
        members[i].config, featurizer, 'validation')
    return loop.evaluate(eval_fn, params, batches, mesh, config.train.eval_batches or None, bpb)

  with sharding.mesh_context(mesh), contextlib.ExitStack() as closing:
    latest = [c.latest_step() for c in ckpts]
    start_step = 0
    if any(s is not None for s in latest):
      start_step = max(s for s in latest if s is not None)
      states = []
      for i, c in enumerate(ckpts):
        if latest[i] is None or (latest[i] < start_step and status[i] == 'running'):
          raise checkpoint.DamagedCheckpointError(
              start_step, dirs[i], f'member {members[i].name} has checkpoint {latest[i]} '
              f'while the population is at step {start_step}')
        it = iters[i] if own or i == 0 else pipeline.make_train_iter(
            members[i].config, featurizer, 'train')
        st, _ = c.restore_intact(pstep.member_abstract, it, fallback=config.train.restore_fallback,
                                 log=lambda note: print(f'warning: {note}', file=sys.stderr))
        if st is None:
          raise checkpoint.DamagedCheckpointError(start_step, dirs[i], 'no intact checkpoint')
        states.append(st)
      state = pstep.stack(states)
    else:
      state = pstep.init()
    active_host = np.array([s == 'running' for s in status])
    active = jax.numpy.asarray(active_host)
    breakdown = factory.param_breakdown(pstep.unstack(state, 0).params, config.model)
    writers = []
    for i, (d, m, r) in enumerate(zip(dirs, members, recorders)):
      w = closing.enter_context(metrics_lib.MetricsWriter(d, steps, start_step, config=m.config,
                                                          identity=r.identity()))
      w.end_progress()   # one line per log for the whole population instead of N bars
      writers.append(w)
      if status[i] == 'running':
        r.start(m.config, breakdown, start_step)
    print(f'population of {n} in {workdir}' + (f' (resuming at step {start_step})'
                                                  if start_step else '')
          + f': {", ".join(m.name for m in members)}; data {config.train.population_data}\n'
          f'member parameters: ' + ', '.join(f'{k} {v:,}' if isinstance(v, int) else f'{k} {v}'
                                             for k, v in breakdown.items()))

    def each_active(fn):
      for i in range(n):
        if active_host[i]:
          fn(i)

    def evaluate_all(step):
      def one(i):
        ev = member_eval(state, i)
        writers[i].write(step, 'validation', ev)
        recorders[i].evaluated(step, ev)
        finals[i] = {'step': step, **{k: float(v) for k, v in ev.items()
                                      if k not in ('targets', 'bytes')}}
      each_active(one)
      print(f'step {step}: validation bits/byte ' + ', '.join(
          f'{members[i].name} {finals[i]["bits_per_byte" if bpb else "loss"]:.4f}'
          for i in range(n) if active_host[i]))

    def sync_active(step):
      nonlocal active_host
      now = np.asarray(jax.device_get(active))
      for i in np.nonzero(active_host & ~now)[0]:
        status[i] = 'diverged'
        err = divergence.DivergenceError(
            f'population member {members[i].name}: loss or gradient norm not finite by step '
            f'{step}; it stopped at its last finite parameters while the others went on')
        recorders[i].crashed(err)
        print(f'warning: {err}', file=sys.stderr)
      active_host = now
      _write_summary(workdir, members, status, finals)

    _write_summary(workdir, members, status, finals)
    with preemption.PreemptionWatcher() as watcher:
      if start_step == 0:
        evaluate_all(0)
      last_time, last_step, stopped_at = time.perf_counter(), start_step, None
      try:
        for step in range(start_step + 1, steps + 1):
          batch = _member_batch(iters, config.train.grad_accum, own)
          placed = jax.device_put(batch, pstep.batch_sharding)
          state, m, active = pstep.step(state, placed, hp, active)
          if step == start_step + 1:
            jax.block_until_ready(m)
            first_s = metrics_lib.seconds_since_process_start()
            for i in range(n):
              recorders[i].first_step(step, first_s)
          if step % config.train.log_every == 0 or step == steps:
            m = jax.device_get(m)
            sync_active(step)
            now = time.perf_counter()
            def log(i):
              row = {k: float(v[i]) for k, v in m.items() if k != 'nonfinite'}
              if not bpb:
                row.pop('bits_per_byte', None)
              row['targets_per_s'] = row['targets'] * (step - last_step) / (now - last_time)
              writers[i].write(step, 'train', row)
            each_active(log)
            rate = sum(float(m['targets'][i]) for i in range(n)) * (step - last_step) / (
                now - last_time)
            print(f'step {step}/{steps}: loss ' + ', '.join(
                f'{float(m["loss"][i]):.3f}' for i in range(n) if active_host[i])
                + f'; {rate:,.0f} targets/s for the population')
            last_time, last_step = time.perf_counter(), step
          if step % config.train.eval_every == 0 or step == steps:
            sync_active(step)
            evaluate_all(step)
            last_time = time.perf_counter()
          preempted = watcher.stop_requested(step)
          if preempted or step % config.train.ckpt_every == 0 or step == steps:
            sync_active(step)
            def save(i):
              ckpts[i].save(step, pstep.unstack(state, i), iters[i] if own else iters[0],
                            force=preempted or step == steps)
            each_active(save)
          if preempted and step < steps:
            stopped_at = step
            break
      finally:
        for c in ckpts:
          c.close()
    if stopped_at is not None:
      for i in range(n):
        if active_host[i]:
          status[i] = 'preempted'
          recorders[i].preempted(stopped_at, watcher.signal_name)
      _write_summary(workdir, members, status, finals)
      print(f'{watcher.signal_name}: stopped after step {stopped_at} of {steps}; every member '
            'saved its checkpoint. Run the same command again to resume.')
      return {'stopped_at': stopped_at}
    def finish(i):
      export_lib.save_export(os.path.join(dirs[i], 'export'), pstep.unstack(state, i).params,
                             members[i].config)
      status[i] = 'finished'
      recorders[i].finished()
    each_active(finish)
    _write_summary(workdir, members, status, finals)
    print(f'exported {int(active_host.sum())} of {n} members under '
          f'{os.path.join(workdir, population.MEMBERS_DIR)}')
  return {m.name: f for m, f in zip(members, finals)}

