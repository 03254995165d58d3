"""The training run: config -> tokenizer -> data -> sharded state -> steps -> checkpoints -> export."""

import contextlib
import functools
import math
import os
import sys
import tempfile
import time

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from stlm.config import validate as config_validate
from stlm import export as export_lib
from stlm import tokenizers
from stlm.data import chat
from stlm.data import phases
from stlm.data import pipeline
from stlm.data import sft
from stlm.data import tfds_builders
from stlm.models import factory
from stlm.models import kinds
from stlm.train import benchmarks
from stlm.train import checkpoint
from stlm.train import compile_cache
from stlm.train import disk
from stlm.train import distill
from stlm.train import divergence
from stlm.train import lease as lease_lib
from stlm.train import metrics as metrics_lib
from stlm.train import preemption
from stlm.train import run_info
from stlm.train import sharding
from stlm.train import setup as setup_lib
from stlm.train import step as step_lib
from stlm.train import wandb_writer


def build_run_tokenizer(config, workdir: str):
  """The run's tokenizer; a sentencepiece model is trained on the train split once, in workdir."""
  tok = config.tokenizer
  if tok.kind == 'sentencepiece':
    if not tok.sp_model_path:
      tok.sp_model_path = os.path.abspath(os.path.join(workdir, 'tokenizer.model'))
    # Process 0 trains and saves the model first; the others then load it (or, where hosts
    # do not share the workdir, train the same model themselves: training is deterministic).
    _sync_after_process_zero(lambda: _sentencepiece(config), 'sentencepiece model')
    return _sentencepiece(config)
  return tokenizers.build_tokenizer(tok)


def _sentencepiece(config):
  """Loads tokenizer.sp_model_path, training and saving it there first if it is missing."""
  tok = config.tokenizer
  if os.path.isfile(tok.sp_model_path):
    return tokenizers.build_tokenizer(tok)
  # The train split of whatever data.source names (validation stays unseen by the tokenizer).
  docs = pipeline.document_dataset(config, 'train')
  return tokenizers.build_tokenizer(
      tok, train_texts=(tfds_builders.record_text(docs[i]) for i in range(len(docs))))


def _sync_after_process_zero(fn, what: str) -> None:
  """Runs fn on process 0 first, then lets the others go (shared files: no write race)."""
  if jax.process_index() == 0:
    fn()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'stlm: {what} ready')


def _prepare_data(config) -> None:
  """tfds preparation (idempotent) of every source, by process 0 before the others."""
  _sync_after_process_zero(lambda: tfds_builders.prepare_all(config.data), 'data')


def _check_export_is_ours(workdir: str, config) -> None:
  export_dir = os.path.join(workdir, 'export')
  if not os.path.exists(export_dir):
    return
  if not export_lib.is_export(export_dir):
    raise checkpoint.CheckpointMismatchError(
        f'{export_dir} exists but is not an stlm export; refusing to overwrite it.')
  diffs = checkpoint.config_differences(export_lib.load_config(export_dir).to_dict(), config)
  diffs = [d for d in diffs if not d.startswith('tokenizer.sp_model_path')]
  if diffs:
    raise checkpoint.CheckpointMismatchError(
        f'{export_dir} holds an export of a different config; refusing to overwrite it. '
        'Use another --workdir. Differences:\n  ' + '\n  '.join(diffs))


def _check_init_from(config):
  """The export train.init_from names, refused (before anything in workdir is written)
  unless its model and tokenizer sections are this run's; None when unset."""
  path = config.train.get('init_from', '')
  if not path:
    return None
  saved = export_lib.check_export(path, '--config.train.init_from')
  diffs = checkpoint.init_from_differences(saved.to_dict(), config)
  if diffs:
    raise checkpoint.CheckpointMismatchError(
        f'--config.train.init_from={path} is an export of a different model; refusing to '
        'start from it. Only data, train, sft, seed and mesh keys may differ. Differences:\n  '
        + '\n  '.join(diffs))
  return path


def _initialised_from(state, path: str, shardings):
  """`state` with the params of the export at `path` (the optimizer state stays fresh)."""
  exported = export_lib.load_export(path, '--config.train.init_from')
  params = jax.device_put(exported.params, shardings.params)
  return state.replace(params=params)


def _check_batch(config, mesh) -> None:
  sharding.check_batch(config.train.batch_size, mesh)
  if jax.process_count() > 1:
    sharding.process_batch_rows(mesh, config.train.batch_size)


def _make_mesh_checked(config):
  """The mesh, with a mesh or batch that cannot fit the devices reported as bad config."""
  try:
    mesh = sharding.make_mesh(config.mesh)
    _check_batch(config, mesh)
  except ValueError as e:
    raise config_validate.ConfigError(str(e)) from None
  return mesh


def check_workdir(workdir: str) -> None:
  """A workdir that is a file, or cannot be written, stops the run before any work."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_validate.ConfigError(f'--workdir={workdir} is a file, not a directory')
  probe_dir = workdir
  while not os.path.exists(probe_dir):   # the nearest existing ancestor must be writable
    probe_dir = os.path.dirname(probe_dir)
  if not os.path.isdir(probe_dir):
    raise config_validate.ConfigError(f'--workdir={workdir}: {probe_dir} is a file')
  try:   # a real write: permission bits do not tell (root, read-only mounts)
    os.rmdir(tempfile.mkdtemp(prefix='.stlm_probe_', dir=probe_dir))
  except OSError as e:
    raise config_validate.ConfigError(
        f'--workdir={workdir}: cannot write in {probe_dir} ({e.strerror})') from None


def _stack(batches):
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def evaluate(eval_fn, params, eval_iter, mesh, max_batches=None,
             reports_bits_per_byte: bool = True) -> dict:
  """Validation loss, bits per byte (where the kind reports it) and the model's per-target
  stats (e.g. masked-token accuracy) over (up to max_batches of) the validation split."""
  totals, template, it, i = None, None, iter(eval_iter), 0
  while max_batches is None or i < max_batches:
    batch = next(it, None)
    if jax.process_count() > 1:
      # Each process holds its own share of the validation split, so their batch counts can
      # differ; every process must join every step, so one that ran out feeds padding rows
      # (loss_mask 0: they count for nothing) until all have run out.
      if not multihost_utils.process_allgather(np.int32(batch is not None)).any():
        break
      if batch is None:
        batch = {k: np.zeros_like(v) for k, v in template.items()}
    elif batch is None:
      break
    template = batch if template is None else template
    sums = eval_fn(params, sharding.global_batch(batch, mesh, leading_microbatch_axis=False))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    i += 1
  if totals is None:
    raise ValueError('the validation split produced no batches; raise config.data.val_fraction')
  totals = jax.device_get(totals)
  out = {'loss': totals['nll'] / max(totals['units'], 1.0),
         'targets': totals['targets'], 'bytes': totals['bytes']}
  if reports_bits_per_byte:
    out['bits_per_byte'] = totals['nll'] / math.log(2) / max(totals['bytes'], 1.0)
  for k, v in totals.get('stats', {}).items():
    out[k] = v / max(totals['targets'], 1.0)
  return out


def train(config: ml_collections.ConfigDict, workdir: str,
          config_path: str | None = None) -> dict:
  """Trains (or resumes) the run in workdir; returns the final validation metrics.

  `config_path` (the --config file) gives run.json the config's docstring. The run holds
  the workdir's lease (stlm/train/lease.py) throughout: a second run there is refused with
  lease.LeaseHeldError before it writes anything.
  """
  workdir = os.path.abspath(workdir)
  check_workdir(workdir)
  lease = lease_lib.WorkdirLease(
      workdir, stale_s=config.train.lease_stale_s,
      enabled=jax.process_index() == 0, log=lambda line: print(line, file=sys.stderr))
  with lease:
    recorder = run_info.RunRecorder(workdir, config, config_path)
    try:
      return _train(config, workdir, recorder)
    except BaseException as e:  # also KeyboardInterrupt: the report must say it stopped
      recorder.crashed(e)
      raise


def _train(config: ml_collections.ConfigDict, workdir: str, recorder) -> dict:
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked private copy
  config_validate.validate(config)
  wandb_writer.import_wandb(config)   # a missing optional package stops the run before any work
  benchmarks.check(config)            # and so do missing benchmark files
  distill.check(config, vocabulary=False)   # and a missing or unsuitable teacher
  # Before anything is compiled: JAX reads the cache setting at the first compilation.
  compile_cache.enable(config.train.get('compile_cache_dir', ''))
  # Data first: a bad corpus must stop the run before anything is created in workdir, and a
  # sentencepiece tokenizer is trained on the prepared train split.
  _prepare_data(config)
  tokenizer = build_run_tokenizer(config, workdir)
  config.model.vocab_size = tokenizer.vocab_size
  if sft.enabled(config) and not config.sft.markers:
    config.sft.markers = chat.get_template(config.sft.template).to_json()  # kept in the export
  config_validate.validate(config)
  distill.check(config)               # the teacher's export, tokenizer and vocabulary

  mesh = _make_mesh_checked(config)
  model = factory.build_model(config.model)
  featurizer = factory.make_featurizer(config, tokenizer)
  # Instruction tuning trains on conversation records; validation always scores responses.
  train_featurizer = sft.maybe_wrap(config, featurizer)
  eval_featurizer = sft.maybe_wrap(config, featurizer, loss_on='response')
  proc, nproc = jax.process_index(), jax.process_count()
  train_iter = pipeline.make_train_iter(config, train_featurizer, 'train',
                                        process_index=proc, process_count=nproc)
  ckpts = checkpoint.RunCheckpoints(workdir, config, keep=config.train.keep_checkpoints,
                                    corpus=tfds_builders.fingerprint(config.data))
  ckpts.check_config()          # before anything in workdir is written
  _check_export_is_ours(workdir, config)
  # Only a run that starts at step 0 reads it: a resumed run has its own params.
  init_from = _check_init_from(config) if ckpts.latest_step() is None else None
  make_eval_iter = functools.partial(pipeline.make_eval_iter, config, eval_featurizer,
                                     'validation',
                                     process_index=proc, process_count=nproc)
  train_step = setup_lib.build_train_step(config, model, mesh)
  train_fn, state = train_step.step, None
  # The mesh plus the logical axis rules: the models' activation constraints resolve to it.
  # The ExitStack closes the metrics writer on every way out; an exception marks its W&B run
  # failed (the normal and preempted endings close it themselves, as before).
  with sharding.mesh_context(mesh), contextlib.ExitStack() as closing:
    start_step, fallback_notes, init_note = 0, [], None
    if ckpts.latest_step() is not None:
      # Restored onto the abstract state: a resumed run never runs (or compiles) the init.
      state, start_step = ckpts.restore_intact(
          train_step.abstract_state, train_iter, fallback=config.train.restore_fallback,
          log=fallback_notes.append)
      if state is None:  # every checkpoint was damaged (and moved aside): restart the data too
        train_iter = pipeline.make_train_iter(config, train_featurizer, 'train',
                                              process_index=proc, process_count=nproc)
    if state is None:
      state = train_step.init()
      if init_from:
        state = _initialised_from(state, init_from, train_step.state_shardings)
        init_note = f'params initialised from {init_from} (fresh optimizer state)'
    breakdown = factory.param_breakdown(state.params, config.model)
    kind = kinds.get_kind(config.model.kind)
    data_phases = phases.parse(config.data.phases)
    boundaries = set(phases.boundaries(data_phases))
    writer = closing.enter_context(metrics_lib.MetricsWriter(
        workdir, config.train.steps, start_step, config=config, identity=recorder.identity()))
    for note in fallback_notes:
      writer.message(f'warning: {note}')
    if init_note:
      writer.message(init_note)
    recorder.start(config, breakdown, start_step)
    writer.message(_describe(config, state.params, breakdown, mesh, workdir, start_step))
    writer.message(f'metrics: {os.path.join(workdir, "metrics.jsonl")}; TensorBoard: '
                   f'tensorboard --logdir {os.path.join(workdir, "tensorboard")}')
    if writer.wandb_run_id:
      writer.message(f'W&B: run {writer.wandb_run_id} ({config.train.wandb_mode}) in '
                     f'{os.path.join(workdir, wandb_writer.WANDB_DIR)}')
    peak, peak_source = metrics_lib.peak_flops_per_device()
    flops_per_unit = kind.flops_per_target(config.model, breakdown)
    if train_step.teacher is not None:   # its forward: a third of its training FLOPs
      t = train_step.teacher
      t_breakdown = factory.param_breakdown(t.params, t.config.model)
      t_flops = kinds.get_kind(t.config.model.kind).flops_per_target(t.config.model,
                                                                       t_breakdown) / 3
      flops_per_unit += t_flops
      writer.message(f'distilling from {config.train.distill.teacher} '
                     f'({t.config.name}:{t.config.preset}, {t_breakdown["total"]:,} parameters, '
                     f'{t_flops:.3g} forward FLOPs per target; alpha '
                     f'{config.train.distill.alpha}, temperature '
                     f'{config.train.distill.temperature}, top_k {config.train.distill.top_k})')
    rate_label = {'tokens': 'tok/s'}.get(kind.target_unit, f'{kind.target_unit}/s')

    eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model))
    bpb = kind.reports_bits_per_byte
    bench = (benchmarks.InTrainingBenchmarks(config, model, featurizer, state.params)
             if benchmarks.every(config) else None)
    cost_told = False

    def run_benchmarks(step):
      told = bench.measured_share is not None
      row = bench.evaluate(state.params)
      writer.write(step, benchmarks.SPLIT, row)
      writer.message(f'step {step}: benchmarks {benchmarks.row_summary(row)}')
      if not told and bench.measured_share is not None:   # once: the first measured share
        writer.message(bench.measured_line())

    guard = divergence.DivergenceGuard(config.train.nonfinite_policy,
                                       config.train.max_consecutive_skips, start_step)
    final_eval, stopped_at, rate = None, None, None
    # From here a SIGTERM/SIGINT stops after the next step with a checkpoint (before, there is
    # nothing to save and the default handlers end the process at once).
    with preemption.PreemptionWatcher() as watcher:
      why = ckpts.space_shortfall(state)
      if why:   # before any training: nothing would be saved
        raise disk.DiskSpaceError(f'{why}; free space or use another --workdir')
      if start_step == 0:  # the untrained reference every learning curve is read against
        ev = evaluate(eval_fn, state.params, make_eval_iter(), mesh,
                      config.train.eval_batches or None, bpb)
        writer.write(0, 'validation', ev)
        writer.message(_eval_line(0, ev))
        if bench:
          run_benchmarks(0)
      last_time, last_step = time.perf_counter(), start_step
      try:
        for step in range(start_step + 1, config.train.steps + 1):
          micro = [next(train_iter) for _ in range(config.train.grad_accum)]
          state, m = train_fn(state, sharding.global_batch(_stack(micro), mesh, True))
          guard.observe(m)   # device-side: no host sync
          if step == start_step + 1:  # one sync, once: how long a (re)start takes to train
            jax.block_until_ready(m)
            first_s = metrics_lib.seconds_since_process_start()
            recorder.first_step(step, first_s)
            writer.message(f'step {step} done {first_s:.1f} s after process start')
          if step % config.train.log_every == 0 or step == config.train.steps:
            m = jax.device_get(m)
            if not bpb:  # the kind's nll / bytes is not a bits per byte (e.g. masked LM)
              m = {k: v for k, v in m.items() if k != 'bits_per_byte'}
            now = time.perf_counter()
            rate = float(m['targets']) * (step - last_step) / (now - last_time)
            # The estimate waits for an interval without the first step (its compilation).
            if bench and bench.last_seconds is not None and not cost_told and \
                last_step > start_step:
              writer.message(bench.cost_line((now - last_time) / (step - last_step)))
              cost_told = True
            mfu = rate * flops_per_unit / (peak * jax.device_count())
            m = {k: v for k, v in m.items() if k != 'nonfinite'}
            writer.write(step, 'train', {**m, 'skipped': guard.interval_skips(),
                                         'targets_per_s': rate, 'mfu': mfu})
            writer.progress(step, {'loss': m['loss'],
                                   **({'bpb': m['bits_per_byte']} if bpb else {}),
                                   **({'acc': m['accuracy']} if 'accuracy' in m else {}),
                                   rate_label: rate, 'mfu': mfu})
            guard.check(state.params)
            last_time, last_step = time.perf_counter(), step
          evaluated = False
          if step % config.train.eval_every == 0 or step == config.train.steps:
            ev = evaluate(eval_fn, state.params, make_eval_iter(), mesh,
                          config.train.eval_batches or None, bpb)
            writer.write(step, 'validation', ev)
            writer.message(_eval_line(step, ev))
            final_eval = ev
            recorder.evaluated(step, ev, rate)
            evaluated = True
          if bench and bench.due(step):
            run_benchmarks(step)
            evaluated = True
          if evaluated:
            last_time = time.perf_counter()  # evaluation time is not training throughput
          if step in boundaries:
            writer.message(f'step {step}: data phase {phases.phase_at(data_phases, step).label!r} '
                           f'done; {phases.phase_at(data_phases, step + 1).label!r} next')
          preempted = watcher.stop_requested(step)
          if preempted or step % config.train.ckpt_every == 0 or step == config.train.steps:
            guard.check(state.params, f'saving checkpoint {step}')
            ckpts.wait()   # the previous save's size is what this one needs
            why = ckpts.space_shortfall(state)
            if why:
              kept = ckpts.latest_step()
              raise disk.DiskSpaceError(
                  f'{why}; stopped after step {step} without saving it ('
                  + (f'checkpoint {kept} is kept' if kept is not None else 'no checkpoint yet')
                  + '). Free space and run the same command again to resume.')
            ckpts.save(step, state, train_iter, force=preempted or step == config.train.steps)
          if preempted and step < config.train.steps:
            stopped_at = step
            break
      finally:
        # Waits for the async save: a preempted run exits only once its checkpoint is on
        # disk, and a run stopped by the divergence guard keeps its last (finite) save.
        ckpts.close()
    writer.end_progress()
    if stopped_at is not None:
      writer.message(f'{watcher.signal_name}: stopped after step {stopped_at} of '
                     f'{config.train.steps}; checkpoint saved in '
                     f'{ckpts.step_dir(stopped_at)}. Run the same command again to resume.')
      writer.close()
      recorder.preempted(stopped_at, watcher.signal_name)
      return {'stopped_at': stopped_at}
    writer.message(f'MFU is relative to {peak / 1e12:.3g} TFLOP/s per device ({peak_source}).')

    if final_eval is None:  # resumed at the last step: nothing left to train
      final_eval = evaluate(eval_fn, state.params, make_eval_iter(), mesh,
                            config.train.eval_batches or None, bpb)
    guard.check(state.params, 'exporting')
    export_dir = os.path.join(workdir, 'export')
    export_lib.save_export(export_dir, state.params, config)
    writer.message(f'exported params + config to {export_dir}')
    writer.close()
  results_path = _final_benchmarks(config, export_dir, workdir)
  if results_path:
    recorder.results(results_path)
  recorder.finished()
  return final_eval


def _eval_line(step: int, ev: dict) -> str:
  labels = {'bits_per_byte': 'bits/byte'}   # then the model's stats by name
  return f'step {step}: validation ' + ', '.join(
      f'{labels.get(k, k)} {ev[k]:.4f}' for k in ev if k not in ('targets', 'bytes'))


def _describe(config, params, breakdown, mesh, workdir, start_step) -> str:
  b = breakdown
  lines = [f'run {config.name}:{config.preset} in {workdir}'
           + (f' (resuming at step {start_step})' if start_step else ''),
           f'mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} '
           f'device(s), {jax.process_count()} process(es)',
           'parameters: ' + ', '.join(f'{k} {v:,}' if isinstance(v, int) else f'{k} {v}'
                                      for k, v in b.items())]
  report = kinds.get_kind(config.model.kind).param_report(params, config.model)
  if report:
    lines.append(report)
  return '\n'.join(lines)


def _final_benchmarks(config, export_dir: str, workdir: str) -> str | None:
  """Runs train.final_eval_benchmarks; writes and returns <workdir>/results.json."""
  names = [n for n in config.train.final_eval_benchmarks.split(',') if n]
  if not names:
    return None
  from stlm.eval import zero_shot  # pylint: disable=g-import-not-at-top
  exported = export_lib.load_export(export_dir)
  results = zero_shot.run_benchmarks(exported, names, config.train.final_eval_data_dir)
  print(f'final benchmarks ({workdir}): {results}')
  path = os.path.join(workdir, run_info.RESULTS_FILE)
  if jax.process_index() == 0:
    zero_shot.write_results(path, exported, export_dir, results)
  return path
