"""Times the jitted train step of a config on synthetic batches: targets/s and MFU.

  python benchmarks/train_step.py --config=configs/baseline.py:50m [--steps 10] \
      [--config.train.batch_size=8 --config.model.dtype=bfloat16 ...]

Runs the trainer's own step (same sharding, accumulation and optimizer) on random token or
byte batches, so the figure is model and step cost without data loading. MFU is relative to
the chip's data-sheet bf16 peak, or to a measured float32 matmul rate where there is none (CPU).
"""

import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from stlm import config_validate
from stlm.models import factory
from stlm.models import kinds
from stlm.train import metrics as metrics_lib
from stlm.train import sharding
from stlm.train import state as state_lib

config_flags.DEFINE_config_file('config', 'configs/baseline.py', 'Config file[:preset].')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after one compile-and-warm-up step).')


def synthetic_batches(config, rng):
  """grad_accum x batch rows of the model's layout, every target real (no padding)."""
  return kinds.get_kind(config.model.kind).synthetic_batch(
      config.model, rng, (config.train.grad_accum, config.train.batch_size))


def main(argv):
  del argv
  config = ml_collections.ConfigDict(flags.FLAGS.config.to_dict())
  config_validate.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  model = factory.build_model(config.model)
  batches = sharding.global_batch(synthetic_batches(config, np.random.default_rng(0)), mesh,
                                  leading_microbatch_axis=True)
  train_step = state_lib.build_train_step(config, model, mesh)
  train_fn, state = train_step.step, train_step.init()
  with sharding.mesh_context(mesh):
    breakdown = factory.param_breakdown(state.params, config.model)
    state, m = train_fn(state, batches)                  # compile + warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(_STEPS.value):
      start = time.perf_counter()
      state, m = train_fn(state, batches)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  targets = config.train.grad_accum * config.train.batch_size * config.model.max_len
  peak, source = metrics_lib.peak_flops_per_device()
  rate = targets / step_s
  mfu = rate * metrics_lib.flops_per_unit(config, breakdown) / (peak * jax.device_count())
  print(f'{config.name}:{config.preset} on {jax.device_count()} x {jax.devices()[0].device_kind}, '
        f'mesh {dict(mesh.shape)}, dtype {config.model.dtype}, '
        f'{breakdown["total"]:,} params')
  unit = kinds.get_kind(config.model.kind).target_unit
  print(f'step {step_s * 1e3:.1f} ms (median of {len(times)}), {rate:,.0f} {unit}/s, '
        f'MFU {mfu:.1%} of {peak / 1e12:.3g} TFLOP/s per device ({source})')


if __name__ == '__main__':
  app.run(main)
