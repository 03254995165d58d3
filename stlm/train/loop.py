"""The training run: config -> tokenizer -> data -> sharded state -> steps -> checkpoints -> export."""

import functools
import math
import os
import time

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from stlm import config_validate
from stlm import export as export_lib
from stlm import tokenizers
from stlm.data import featurize
from stlm.data import pipeline
from stlm.data import tfds_builders
from stlm.models import factory
from stlm.models import kinds
from stlm.train import checkpoint
from stlm.train import metrics as metrics_lib
from stlm.train import sharding
from stlm.train import state as state_lib
from stlm.train import step as step_lib


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
  names = sorted(dict(config.data.mix)) if config.data.source == 'mix' else [config.data.source]
  _sync_after_process_zero(lambda: [tfds_builders.prepare(n, config.data) for n in names],
                           'data')


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


def _check_batch(config, mesh) -> None:
  sharding.check_batch(config.train.batch_size, mesh)
  if jax.process_count() > 1:
    sharding.process_batch_rows(mesh, config.train.batch_size)


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


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in workdir; returns the final validation metrics."""
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked private copy
  config_validate.validate(config)
  workdir = os.path.abspath(workdir)
  # Data first: a bad corpus must stop the run before anything is created in workdir, and a
  # sentencepiece tokenizer is trained on the prepared train split.
  _prepare_data(config)
  tokenizer = build_run_tokenizer(config, workdir)
  config.model.vocab_size = tokenizer.vocab_size
  config_validate.validate(config)

  mesh = sharding.make_mesh(config.mesh)
  _check_batch(config, mesh)
  model = factory.build_model(config.model)
  featurizer = featurize.make_featurizer(config, tokenizer)
  proc, nproc = jax.process_index(), jax.process_count()
  train_iter = pipeline.make_train_iter(config, featurizer, 'train',
                                        process_index=proc, process_count=nproc)
  ckpts = checkpoint.RunCheckpoints(workdir, config, keep=config.train.keep_checkpoints)
  ckpts.check_config()          # before anything in workdir is written
  _check_export_is_ours(workdir, config)
  make_eval_iter = functools.partial(pipeline.make_eval_iter, config, featurizer, 'validation',
                                     process_index=proc, process_count=nproc)
  train_step = state_lib.build_train_step(config, model, mesh)
  train_fn, state = train_step.step, train_step.init()
  # The mesh plus the logical axis rules: the models' activation constraints resolve to it.
  with sharding.mesh_context(mesh):
    start_step = 0
    if ckpts.latest_step() is not None:
      state = ckpts.restore(train_step.abstract_state, train_iter)
      start_step = int(state.step)

    breakdown = factory.param_breakdown(state.params, config.model)
    kind = kinds.get_kind(config.model.kind)
    writer = metrics_lib.MetricsWriter(workdir, config.train.steps, start_step)
    writer.message(_describe(config, state.params, breakdown, mesh, workdir, start_step))
    peak, peak_source = metrics_lib.peak_flops_per_device()
    flops_per_unit = kind.flops_per_target(config.model, breakdown)
    rate_label = {'tokens': 'tok/s'}.get(kind.target_unit, f'{kind.target_unit}/s')

    eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model))
    bpb = kind.reports_bits_per_byte

    if start_step == 0:  # the untrained reference every learning curve is read against
      ev = evaluate(eval_fn, state.params, make_eval_iter(), mesh,
                    config.train.eval_batches or None, bpb)
      writer.write(0, 'validation', ev)
    last_time, last_step = time.perf_counter(), start_step
    final_eval = None
    for step in range(start_step + 1, config.train.steps + 1):
      micro = [next(train_iter) for _ in range(config.train.grad_accum)]
      state, m = train_fn(state, sharding.global_batch(_stack(micro), mesh, True))
      if step % config.train.log_every == 0 or step == config.train.steps:
        m = jax.device_get(m)
        if not bpb:  # the kind's nll / bytes is not a bits per byte (e.g. masked LM)
          m = {k: v for k, v in m.items() if k != 'bits_per_byte'}
        now = time.perf_counter()
        rate = float(m['targets']) * (step - last_step) / (now - last_time)
        mfu = rate * flops_per_unit / (peak * jax.device_count())
        writer.write(step, 'train', {**m, 'targets_per_s': rate, 'mfu': mfu})
        writer.progress(step, {'loss': m['loss'],
                               **({'bpb': m['bits_per_byte']} if bpb else {}),
                               **({'acc': m['accuracy']} if 'accuracy' in m else {}),
                               rate_label: rate, 'mfu': mfu})
        if not np.isfinite(m['loss']):
          raise FloatingPointError(f'loss became {m["loss"]} at step {step}; stopping before '
                                   'a checkpoint of the diverged state is written')
        last_time, last_step = time.perf_counter(), step
      if step % config.train.eval_every == 0 or step == config.train.steps:
        ev = evaluate(eval_fn, state.params, make_eval_iter(), mesh,
                      config.train.eval_batches or None, bpb)
        writer.write(step, 'validation', ev)
        labels = {'bits_per_byte': 'bits/byte'}   # then the model's stats by name
        writer.message(f'step {step}: validation ' + ', '.join(
            f'{labels.get(k, k)} {ev[k]:.4f}' for k in ev if k not in ('targets', 'bytes')))
        final_eval = ev
        last_time = time.perf_counter()  # evaluation time is not training throughput
      if step % config.train.ckpt_every == 0 or step == config.train.steps:
        ckpts.save(step, state, train_iter, force=step == config.train.steps)
    ckpts.close()
    writer.end_progress()
    writer.message(f'MFU is relative to {peak / 1e12:.3g} TFLOP/s per device ({peak_source}).')

    if final_eval is None:  # resumed at the last step: nothing left to train
      final_eval = evaluate(eval_fn, state.params, make_eval_iter(), mesh,
                            config.train.eval_batches or None, bpb)
    export_dir = os.path.join(workdir, 'export')
    export_lib.save_export(export_dir, state.params, config)
    writer.message(f'exported params + config to {export_dir}')
    writer.close()
  _final_benchmarks(config, export_dir, workdir)
  return final_eval


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


def _final_benchmarks(config, export_dir: str, workdir: str) -> None:
  names = [n for n in config.train.final_eval_benchmarks.split(',') if n]
  if not names:
    return
  from stlm.eval import benchmarks  # pylint: disable=g-import-not-at-top
  results = benchmarks.run_benchmarks(export_lib.load_export(export_dir), names,
                                      config.train.final_eval_data_dir)
  print(f'final benchmarks ({workdir}): {results}')
