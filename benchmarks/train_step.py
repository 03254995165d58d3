"""Times the jitted train step of a config on synthetic batches and reports its whole cost.

  python benchmarks/train_step.py --config=configs/baseline.py:50m [--steps 10] \
      [--config.train.batch_size=8 --config.model.ce_chunk=0 ...] [--compare]

Runs the trainer's own step (same sharding, accumulation and optimizer) on random token or
byte batches, so the figure is model and step cost without data loading. Prints targets/s,
achieved FLOP/s and MFU (against the chip's data-sheet bf16 peak, or on CPU against a
float32 matmul rate measured in this same run), compile time, time to first step (from the
start of main: init + compile + one step), the compiled step's memory (XLA memory analysis),
FLOPs per target from the model's own accounting, and
the projected time of the paper's Table 1 run (6.1B tokens at the 50m preset) on data-sheet
accelerators at --mfu.

--compare also runs the PyTorch peer (benchmarks/torch_peer.py, a transformers Llama of the
same shape) with --peer_python (default $STLM_PEER_PYTHON), a Python that has torch and
transformers, and prints both rates from this one run. Baseline kind only.
"""

import ast
import os
import pathlib
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from stlm import config as config_lib
from stlm.config import validate as config_validate
from stlm.models import factory
from stlm.models import kinds
from stlm.train import metrics as metrics_lib
from stlm.train import sharding
from stlm.train import setup as setup_lib

config_flags.DEFINE_config_file('config', 'configs/baseline.py', 'Config file[:preset].')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after one compile-and-warm-up step).')
_COMPARE = flags.DEFINE_bool('compare', False, 'Also time the PyTorch peer at the same shape.')
_PEER_PYTHON = flags.DEFINE_string('peer_python', os.environ.get('STLM_PEER_PYTHON', ''),
                                   'Python with torch + transformers, for --compare.')
_PEER_THREADS = flags.DEFINE_integer('peer_threads', os.cpu_count(), 'torch threads (CPU).')
_AB = flags.DEFINE_string('ab', '', 'A second setting timed step-by-step interleaved with the '
                          'first, e.g. "model.ce_chunk=0" (both timed under the same conditions).')
_MFU = flags.DEFINE_float('mfu', 0.4, 'MFU assumed for the Table 1 projection.')
_TABLE1_TOKENS = flags.DEFINE_float('table1_tokens', 6.1e9, 'Targets of the Table 1 run.')

# Accelerators of the projection: label -> key of metrics.PEAK_FLOPS (dense bf16 data sheets).
PROJECTION_CHIPS = (('H100 SXM', 'h100'), ('A100', 'a100'), ('L40', 'l40'),
                    ('TPU v5e', 'tpu v5e'))


def synthetic_batches(config, rng):
  """grad_accum x batch rows of the model's layout, every target real (no padding)."""
  return kinds.get_kind(config.model.kind).synthetic_batch(
      config.model, rng, (config.train.grad_accum, config.train.batch_size))


def flops_per_target(config, breakdown) -> float:
  """Training FLOPs per target from the model kind's own accounting."""
  return kinds.get_kind(config.model.kind).flops_per_target(config.model, breakdown)


def table1_flops_per_target(config) -> float:
  """FLOPs per target of this config's model kind at the 50m preset (no allocation)."""
  c50 = config_lib.apply_preset(ml_collections.ConfigDict(config.to_dict()), '50m')
  model = factory.build_model(c50.model)
  breakdown = factory.param_breakdown(factory.abstract_params(model, c50.model), c50.model)
  return flops_per_target(c50, breakdown)


def memory_line(compiled) -> str:
  try:
    mem = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    return f'memory analysis unavailable ({type(e).__name__})'
  if mem is None:
    return 'memory analysis unavailable on this backend'
  mib = 1 / 2**20
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  return (f'memory (XLA analysis of the step): ~{peak * mib:,.0f} MiB = arguments '
          f'{mem.argument_size_in_bytes * mib:,.0f} + outputs {mem.output_size_in_bytes * mib:,.0f}'
          f' - donated {mem.alias_size_in_bytes * mib:,.0f} + temporaries '
          f'{mem.temp_size_in_bytes * mib:,.0f} MiB')


def run_peer(config) -> str:
  """The peer's output line at this config's shape, or why it did not run."""
  m, t = config.model, config.train
  if m.kind != 'baseline':
    return 'peer: skipped (the transformers Llama peer matches model.kind baseline only)'
  if not _PEER_PYTHON.value or not os.path.exists(_PEER_PYTHON.value):
    return ('peer: skipped (no --peer_python / $STLM_PEER_PYTHON with torch + transformers; '
            'see benchmarks/torch_peer.py)')
  script = pathlib.Path(__file__).resolve().parent / 'torch_peer.py'
  cmd = [_PEER_PYTHON.value, str(script), '--hidden', str(m.hidden_dim), '--layers',
         str(m.num_layers), '--heads', str(m.num_heads), '--kv_heads', str(m.num_kv_heads),
         '--ffn', str(m.ffn_dim), '--vocab', str(m.vocab_size), '--batch',
         str(t.batch_size * t.grad_accum), '--seq', str(m.max_len), '--threads',
         str(_PEER_THREADS.value)]
  if not m.tie_embeddings:
    cmd.append('--untied')
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('peer ')]
  if proc.returncode or not lines:
    return f'peer: failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}'
  return lines[-1]


def with_override(config, setting: str):
  """A copy of config with one 'a.b.c=value' setting (value parsed as a Python literal)."""
  key, _, value = setting.partition('=')
  c = ml_collections.ConfigDict(config.to_dict())
  node = c
  *path, leaf = key.split('.')
  for part in path:
    node = node[part]
  try:
    node[leaf] = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    node[leaf] = value
  config_validate.validate(c)
  return c


def main(argv):
  del argv
  config = ml_collections.ConfigDict(flags.FLAGS.config.to_dict())
  config_validate.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  batches = sharding.global_batch(synthetic_batches(config, np.random.default_rng(0)), mesh,
                                  leading_microbatch_axis=True)
  configs = [config] + ([with_override(config, _AB.value)] if _AB.value else [])
  runs = []
  for c in configs:
    train_step = setup_lib.build_train_step(c, factory.build_model(c.model), mesh)
    runs.append(dict(config=c, step=train_step.step, state=train_step.init(), times=[]))
  with sharding.mesh_context(mesh):
    breakdown = factory.param_breakdown(runs[0]['state'].params, config.model)
    for r in runs:
      start = time.perf_counter()
      r['compiled'] = r['step'].lower(r['state'], batches).compile()
      r['compile_s'] = time.perf_counter() - start
      r['state'], m = r['compiled'](r['state'], batches)   # first step (warm-up)
      jax.block_until_ready(m)
      r['first_step_s'] = metrics_lib.seconds_since_process_start()
    for _ in range(_STEPS.value):
      for r in runs:                                      # interleaved: the same conditions for each
        start = time.perf_counter()
        r['state'], m = r['compiled'](r['state'], batches)
        jax.block_until_ready(m)
        r['times'].append(time.perf_counter() - start)
  compiled, compile_s, first_step_s = (runs[0][k] for k in ('compiled', 'compile_s',
                                                             'first_step_s'))
  times = runs[0]['times']
  step_s = statistics.median(times)
  # Real targets (a ragged layout may leave a row's last chunk positions empty).
  targets = float(np.sum(batches['loss_mask']))
  peak, source = metrics_lib.peak_flops_per_device()     # CPU: measured now, same conditions
  rate = targets / step_s
  fpt = flops_per_target(config, breakdown)
  achieved = rate * fpt
  mfu = achieved / (peak * jax.device_count())
  m_cfg = config.model
  print(f'{config.name}:{config.preset} on {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}, dtype {m_cfg.dtype}, '
        f'ce_chunk {m_cfg.get("ce_chunk", 0)}, remat {m_cfg.get("remat", "none")}, '
        f'{breakdown["total"]:,} params, batch {config.train.grad_accum} x '
        f'{config.train.batch_size} x {m_cfg.max_len}')
  unit = kinds.get_kind(config.model.kind).target_unit
  print(f'step {step_s * 1e3:.1f} ms (median of {len(times)}, min {min(times) * 1e3:.1f}), '
        f'{rate:,.0f} {unit}/s, {achieved / 1e9:,.1f} GFLOP/s, MFU {mfu:.1%} of '
        f'{peak / 1e12:.3g} TFLOP/s per device ({source})')
  print(f'FLOPs/target {fpt / 1e6:,.1f} M (the model kind\'s own accounting)')
  print(f'compile {compile_s:.1f} s, time to first step {first_step_s:.1f} s '
        f'(process start to first step done)')
  print(memory_line(compiled))
  fpt50 = table1_flops_per_target(config)
  tokens = _TABLE1_TOKENS.value
  print(f'Table 1 run projection: {tokens / 1e9:.1f}B targets x {fpt50 / 1e6:,.0f} MFLOP/target '
        f'({config.model.kind} at 50m) = {tokens * fpt50:.3g} FLOP, at {_MFU.value:.0%} MFU of '
        f'the dense bf16 data-sheet peak:')
  for label, key in PROJECTION_CHIPS:
    chip_peak = metrics_lib.PEAK_FLOPS[key]
    hours = tokens * fpt50 / (chip_peak * _MFU.value) / 3600
    print(f'  {label:9s} {chip_peak / 1e12:5.0f} TFLOP/s  {hours:6.1f} h on one chip')
  here_h = tokens * fpt50 / achieved / 3600 if fpt50 == fpt else None
  if here_h:
    print(f'  this device at the measured rate: {here_h:,.0f} h')
  for r in runs[1:]:
    ab_s = statistics.median(r['times'])
    print(f'A/B, interleaved in this run: with {_AB.value}: step {ab_s * 1e3:.1f} ms, '
          f'{targets / ab_s:,.0f} targets/s, compile {r["compile_s"]:.1f} s; '
          f'{memory_line(r["compiled"])}; the first setting is {ab_s / step_s:.2f}x as fast')
  if _COMPARE.value:
    line = run_peer(config)
    print(line)
    parts = line.split()
    if line.startswith('peer tokens/s'):
      peer_rate = float(parts[2])
      print(f'stlm {rate:,.0f} vs peer {peer_rate:,.0f} tokens/s: {rate / peer_rate:.2f}x '
            '(same machine, same run, peer after stlm)')


if __name__ == '__main__':
  app.run(main)
