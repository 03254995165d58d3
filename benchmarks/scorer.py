"""Scorer throughput on BLiMP: the plain path vs packed rows + gathered head, same run.

  python benchmarks/scorer.py --data_dir=../shared/data/benchmarks \
      [--config=configs/baseline.py:tiny] [--limit=2000] [--batch_size=32] [--repeats=3] \
      [--task=blimp] [--score_fraction=1.0]

Random-init params of the config (no checkpoint needed: speed does not depend on weights).
BLiMP pairs (a `--limit` sample, seeded) become 2 requests each (`--task` scores another
benchmark's requests instead). Two scorer paths: plain (one request per row, output layer at
every position) and fast (what the kind supports, see `kinds.Scoring`: packed rows, output
layer at K(T) positions). Each is run once to compile, then `--repeats` times, interleaved
with timings of a plain jitted forward of one full batch of random tokens at the largest
bucket, so all are timed under the same conditions.

Prints per path: requests/s (median; the scorer's own time, and end to end with
tokenization), compilations per bucket shape (T, K), rows and padding, and the fraction of
the forward FLOP rate reached: useful FLOPs / s over the forward's FLOPs / s, where a
request's useful FLOPs are its real positions times the forward FLOPs per position (1/3 of
the kind's training FLOPs per target, `ModelKind.flops_per_target`): what an unpadded
forward of just that request costs. The reference forward returns the model's outputs
(log-probabilities and greedy flags); the rate of a forward returning log-probabilities
only (XLA then drops the vocabulary argmax) is printed too. A fraction above 100% means
the gathered head skipped positions whose score is not needed (context positions).
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

from stlm import tokenizers
from stlm.eval import zero_shot
from stlm.eval import loaders
from stlm.eval import scorer as scorer_lib
from stlm.models import factory
from stlm.models import kinds

config_flags.DEFINE_config_file('config', 'configs/baseline.py', 'Config file[:preset].')
_DATA = flags.DEFINE_string('data_dir', None, 'Benchmark release root (holds blimp/).')
_TASK = flags.DEFINE_string('task', 'blimp', 'Benchmark whose requests are scored.')
_LIMIT = flags.DEFINE_integer('limit', 2000, 'Items sampled (seeded; 0 = all).')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Rows per scorer batch.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per path (after a compile run).')
_FRACTION = flags.DEFINE_float('score_fraction', None, 'Fast path K(T) / T (default: the '
                                'scorer\'s own).')
_FORWARD_REPS = flags.DEFINE_integer('forward_reps', 3, 'Timed full-batch forwards per '
                                     'repeat (each reference).')


class Forward:
  """A plain jitted forward of one full batch of random tokens at the largest bucket.

  outputs='all' returns the model's whole output dict (log-probabilities and greedy flags,
  what scoring needs); 'logprobs' returns only log-probabilities, so XLA may drop the argmax
  over the vocabulary (a cheaper, optimistic reference).
  """

  def __init__(self, model, params, model_cfg, batch_size: int, outputs: str):
    kind = kinds.get_kind(model_cfg.kind)
    self.batch = kind.synthetic_batch(model_cfg, np.random.default_rng(0), (batch_size,))
    self.params = params
    pick = (lambda out: out) if outputs == 'all' else (lambda out: out['logprobs'])
    self.fn = jax.jit(lambda p, b: pick(model.apply({'params': p}, b, deterministic=True)))
    jax.block_until_ready(self.fn(params, self.batch))  # compile
    self.positions = float(np.sum(self.batch['loss_mask']))
    self.times = []

  def time(self, reps: int) -> None:
    for _ in range(reps):
      start = time.perf_counter()
      jax.block_until_ready(self.fn(self.params, self.batch))
      self.times.append(time.perf_counter() - start)


def forward_flops_per_position(model, params, model_cfg) -> float:
  del model
  kind = kinds.get_kind(model_cfg.kind)
  return kind.flops_per_target(model_cfg, kind.param_breakdown(params, model_cfg)) / 3.0


def main(argv):
  del argv
  config = ml_collections.ConfigDict(flags.FLAGS.config.to_dict())
  tok = tokenizers.build_tokenizer(config.tokenizer)
  config.model.vocab_size = tok.vocab_size
  model = factory.build_model(config.model)
  params = factory.init_params(model, config.model, jax.random.PRNGKey(0))
  feat = factory.make_featurizer(config, tok)
  items = zero_shot.sample(loaders.load(_TASK.value, _DATA.value), _LIMIT.value or None)
  requests = [r for p in zero_shot.build_prompts(_TASK.value, items, _DATA.value)
              for r in p.requests]
  m = config.model
  print(f'{config.name}:{config.preset} {m.kind}, {kinds.count_params(params):,} params, '
        f'vocab {m.vocab_size}, window {m.max_len}, {jax.devices()[0].device_kind}; '
        f'{_TASK.value} {len(items)} items = {len(requests)} requests, {_BATCH.value} rows '
        f'per batch')

  kw = dict(max_len=m.max_len, batch_size=_BATCH.value)
  paths = dict(plain=scorer_lib.Scorer(model, params, feat, pack=False, gather=False, **kw),
               fast=scorer_lib.Scorer(model, params, feat, score_fraction=_FRACTION.value,
                                      **kw))
  forwards = dict(all=Forward(model, params, m, _BATCH.value, 'all'),
                  logprobs=Forward(model, params, m, _BATCH.value, 'logprobs'))
  compile_s, times, e2e, stats = {}, {n: [] for n in paths}, {n: [] for n in paths}, {}
  for name, s in paths.items():
    start = time.perf_counter()
    s.loglikelihood(requests)
    compile_s[name] = time.perf_counter() - start
  results = {}
  for _ in range(_REPEATS.value):
    for name, s in paths.items():  # interleaved: the paths and the reference see one load
      start = time.perf_counter()
      results[name] = s.loglikelihood(requests)
      e2e[name].append(time.perf_counter() - start)
      times[name].append(s.stats['seconds'])
      stats[name] = dict(s.stats)
    for f in forwards.values():
      f.time(_FORWARD_REPS.value)
  diff = max(abs(a.logprob - b.logprob) for a, b in zip(results['plain'], results['fast']))
  same_greedy = all(a.is_greedy == b.is_greedy for a, b in zip(results['plain'],
                                                                results['fast']))

  per_pos = forward_flops_per_position(model, params, m)
  rates = {k: f.positions * per_pos / statistics.median(f.times) for k, f in forwards.items()}
  rate = rates['all']
  useful = stats['plain']['positions_used'] * per_pos
  for k, f in forwards.items():
    print(f'forward pass ({k} outputs): {_BATCH.value} x {m.max_len} random tokens in '
          f'{statistics.median(f.times) * 1e3:.1f} ms (median of {len(f.times)}, interleaved '
          f'with the scorer runs) = {rates[k] / 1e9:.2f} GFLOP/s')
  print(f'FLOPs per position {per_pos / 1e6:.2f} M (the kind\'s flops_per_target / 3); the '
        f'fractions below are of the all-outputs rate (logprobs-only in brackets)')
  for name, s in paths.items():
    st = stats[name]
    sec, sec_e2e = statistics.median(times[name]), statistics.median(e2e[name])
    shapes = ', '.join(f'T={T}' + (f' K={K}' if K else '') + f': {c}'
                       for (T, K), c in sorted(s.compiles_by_shape.items(),
                                               key=lambda x: (x[0][0], x[0][1] or 0)))
    fraction = f' K/T={s.score_fraction:g}' if s.gather else ''
    print(f'{name:5s} pack={s.pack!s:5s} gather={s.gather!s:5s}{fraction}: '
          f'{len(requests) / sec:,.0f} requests/s scorer ({len(requests) / sec_e2e:,.0f} end to '
          f'end with tokenization), {useful / sec / rate:.1%} of the forward FLOP rate '
          f'[{useful / sec / rates["logprobs"]:.1%}] ({useful / sec_e2e / rate:.1%} end to end); '
          f'{st["rows"]} rows, '
          f'{st["positions_used"] / st["positions_run"]:.1%} of run positions real; '
          f'compile run {compile_s[name]:.1f} s; compilations per bucket: {shapes}')
  speedup = statistics.median(times['plain']) / statistics.median(times['fast'])
  print(f'speed-up fast / plain: {speedup:.2f}x (scorer time); max |logprob difference| '
        f'{diff:.2e}, greedy flags identical: {same_greedy}')


if __name__ == '__main__':
  flags.mark_flag_as_required('data_dir')
  app.run(main)
