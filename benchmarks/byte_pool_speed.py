"""Train-step speed of baseline vs byte_pool paper vs byte_pool v2 on one core, interleaved.

  python benchmarks/byte_pool_speed.py --core=8x256 --context=256 --batch=8 --rounds=5
  (--models: any rows of stlm/experiments/rows.py, e.g. baseline,v2,v2_cross;
   --byte_sizes=10m: the byte-pool rows with the local-model sizes of that preset)

Each model's own jitted train step (benchmarks/train_step.py's: same sharding, optimizer) runs
on synthetic batches of its layout (v2: chunk lengths as measured on Wikipedia text). Steps are
timed round-robin (one step of each model per round), so every model is timed under the same
conditions; the ratio of medians is the figure to read.
"""

import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import numpy as np

from stlm import tokenizers
from stlm.config import validate as config_validate
from stlm.config import files
from stlm.experiments import rows
from stlm.experiments.rows import ROWS
from stlm.models import factory
from stlm.models import kinds
from stlm.models.byte_pool.v2_kind import CHUNK_LENGTH_PROBS
from stlm.train import sharding
from stlm.train import setup as setup_lib

_CONFIGS_DIR = flags.DEFINE_string('configs_dir', files.DEFAULT_DIR,
                                   'folder of the config files the rows name.')
_CORE = flags.DEFINE_string('core', '8x256', 'layers x hidden of the shared core.')
_HEADS = flags.DEFINE_string('heads', '4/2', 'heads / kv heads.')
_CONTEXT = flags.DEFINE_integer('context', 256, 'positions (tokens = chunks).')
_BATCH = flags.DEFINE_integer('batch', 8, 'rows per step.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'timed rounds (after a compile-and-warm-up step).')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'compute dtype.')
_BYTE_SIZES = flags.DEFINE_string(
    'byte_sizes', '', 'a preset of configs/byte_pool.py (10m, 50m, ...) whose local-model sizes '
    'the byte-pool rows take; empty: the rows\' own (tiny).')
_MODELS = flags.DEFINE_list('models', 'baseline,paper,v2',
                            f'rows of stlm/experiments/rows.py: {", ".join(ROWS)}.')


# Bytes per chunk of the synthetic v2 rows: the context of a byte-level row ('bytes') covers
# as much text as the chunk rows'.
SYNTHETIC_BYTES_PER_CHUNK = float(np.dot(np.arange(1, len(CHUNK_LENGTH_PROBS) + 1),
                                         CHUNK_LENGTH_PROBS) / np.sum(CHUNK_LENGTH_PROBS))


def model_config(name):
  if name not in ROWS:
    raise app.UsageError(f'--models: unknown {name!r}; choose from {", ".join(ROWS)}')
  core = rows.Core.parse(_CORE.value, _HEADS.value, _CONTEXT.value)
  c = rows.shared_core_config(name, core, bytes_per_token=SYNTHETIC_BYTES_PER_CHUNK,
                              configs_dir=_CONFIGS_DIR.value)
  c.model.update(dtype=_DTYPE.value)
  if _BYTE_SIZES.value and ROWS[name].config == rows.byte_pool_config:
    rows.use_byte_sizes(c, _BYTE_SIZES.value, _CONFIGS_DIR.value)
  c.model.vocab_size = tokenizers.build_tokenizer(c.tokenizer).vocab_size
  c.train.update(batch_size=_BATCH.value, grad_accum=1)
  config_validate.validate(c)
  return c


def main(argv):
  del argv
  runs = {}
  for name in _MODELS.value:
    config = model_config(name)
    mesh = sharding.make_mesh(config.mesh)
    model = factory.build_model(config.model)
    batch = kinds.get_kind(config.model.kind).synthetic_batch(
        config.model, np.random.default_rng(0), (1, config.train.batch_size))
    batches = sharding.global_batch(batch, mesh, leading_microbatch_axis=True)
    ts = setup_lib.build_train_step(config, model, mesh)
    state = ts.init()
    with sharding.mesh_context(mesh):
      state, m = ts.step(state, batches)
      jax.block_until_ready(m)
    runs[name] = dict(config=config, mesh=mesh, step=ts.step, state=state, batches=batches,
                      targets=float(np.sum(batch['loss_mask'])), times=[])
  for _ in range(_ROUNDS.value):
    for r in runs.values():
      with sharding.mesh_context(r['mesh']):
        start = time.perf_counter()
        r['state'], m = r['step'](r['state'], r['batches'])
        jax.block_until_ready(m)
        r['times'].append(time.perf_counter() - start)
  base = runs.get('baseline')
  base_rate = base and base['targets'] / statistics.median(base['times'])
  print(f'core {_CORE.value}, heads {_HEADS.value}, context {_CONTEXT.value}, batch '
        f'{_BATCH.value}, {_DTYPE.value}, {jax.devices()[0].device_kind}; median of '
        f'{_ROUNDS.value} interleaved rounds')
  for name, r in runs.items():
    step = statistics.median(r['times'])
    rate = r['targets'] / step
    ratio = f', {rate / base_rate:.2f}x the baseline' if base_rate else ''
    print(f'{name:9s} step {step * 1e3:8.1f} ms  {rate:8.0f} targets/s{ratio}  '
          f'(steps: {", ".join(f"{t:.2f}" for t in r["times"])} s)')


if __name__ == '__main__':
  app.run(main)
