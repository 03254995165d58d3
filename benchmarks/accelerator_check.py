"""Checks what an accelerator adds, in one table: run it once on a new GPU or TPU.

  python benchmarks/accelerator_check.py [--steps 50] [--preset tiny]

Rows:
  attention kernel    Pallas flash attention vs the XLA reference: outputs and q/k/v gradients
                      (float32 and bfloat16), causal, packed segments.
  chunked CE          stlm/models/chunked_ce.py vs the full-logits path: values and gradients.
  train step speed    the baseline's train step with attention_impl xla vs pallas (and 'auto').
  bf16 loss parity    --steps steps of training in float32 vs bfloat16 compute (float32 master
                      weights, float32 loss) from the same init on the same synthetic batches.
On CPU, Pallas runs only in interpret mode: the kernel rows use small shapes there, the speed
row is skipped (it would time the interpreter), and the parity row runs at the tiny preset;
the table says what was skipped and why.
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np

from kernels import attention as attention_lib
from kernels import flash_attention
from stlm import config as config_lib
from stlm.models import chunked_ce
from stlm.models import factory
from stlm.train import sharding
from stlm.train import setup as setup_lib

ROWS = []


def row(check, result, detail):
  ROWS.append((check, result, detail))
  print(f'  {check}: {result} ({detail})', flush=True)


def _max_err(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def check_attention(accel: bool):
  B, T, H, K, D = (4, 512, 8, 2, 64) if accel else (1, 64, 2, 1, 32)
  rng = np.random.default_rng(0)
  seg = np.ones((B, T), np.int32)
  seg[:, T // 2:] = 2
  for dtype, tol in ((jnp.float32, 2e-3), (jnp.bfloat16, 5e-2)):
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, K, D)), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, K, D)), dtype)
    name = jnp.dtype(dtype).name
    why = flash_attention.supports(q.shape, k.shape, dtype)
    if why is not None:
      row(f'attention kernel {name}', 'SKIPPED', why)
      continue

    def loss(impl, q, k, v):
      o = attention_lib.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True,
                                  impl=impl)
      return jnp.sum(o.astype(jnp.float32) ** 2), o

    outs = {impl: jax.jit(jax.value_and_grad(lambda q, k, v, impl=impl: loss(impl, q, k, v),
                                             argnums=(0, 1, 2), has_aux=True))(q, k, v)
            for impl in ('xla', 'pallas')}
    (_, o_x), g_x = outs['xla']
    (_, o_p), g_p = outs['pallas']
    errs = [_max_err(o_p, o_x)] + [_max_err(a, b) / max(float(jnp.max(jnp.abs(b))), 1e-6)
                                   for a, b in zip(g_p, g_x)]
    ok = max(errs) < tol
    row(f'attention kernel {name}', 'PASS' if ok else 'FAIL',
        f'{"" if accel else "interpret mode, "}B{B} T{T} H{H}/{K} D{D}: max |out diff| '
        f'{errs[0]:.1e}, max rel grad diff {max(errs[1:]):.1e} (tol {tol})')


def check_chunked_ce():
  rng = np.random.default_rng(1)
  N, D, V = 300, 64, 5003
  h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
  w = jnp.asarray(0.1 * rng.normal(size=(V, D)), jnp.float32)
  t = jnp.asarray(rng.integers(0, V, N), jnp.int32)
  m = jnp.asarray(rng.random(N) > 0.2, jnp.float32)

  def chunked(h, w):
    return -jnp.sum(chunked_ce.target_scores(h, w, t, chunk=64, weights_N=m)[0] * m)

  def plain(h, w):
    return -jnp.sum(chunked_ce.plain_target_scores(h @ w.T, t)[0] * m)

  (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w)
                      for f in (chunked, plain))
  errs = [abs(float(a - b)) / abs(float(b))] + [_max_err(x, y) for x, y in zip(ga, gb)]
  row('chunked CE', 'PASS' if max(errs) < 1e-4 else 'FAIL',
      f'N{N} D{D} V{V} chunk 64: rel loss diff {errs[0]:.1e}, max grad diff {max(errs[1:]):.1e}')


def _config(preset, **model):
  c = config_lib.apply_preset(config_lib.base_config(), preset)
  c.model.dropout = 0.0
  c.model.update(model)
  c.train.grad_accum = 1
  c.train.warmup_steps = 0
  c.train.schedule = 'constant'
  c.train.compile_cache_dir = ''
  return ml_collections.ConfigDict(c.to_dict())


def _batches(c, n, seed=0):
  """Learnable rows (arithmetic progressions of token ids), so the losses move."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    b = factory.dummy_batch(c.model, c.train.batch_size, c.model.max_len)
    start = rng.integers(0, 256, (c.train.batch_size, 1))
    stride = rng.integers(1, 4, (c.train.batch_size, 1))
    ids = (start + stride * np.arange(c.model.max_len + 1)) % 256
    b.update(inputs=ids[:, :-1].astype(np.int32), targets=ids[:, 1:].astype(np.int32))
    out.append({k: v[None] for k, v in b.items()})
  return out


def _train(c, batches, timed=False):
  """Losses over the batches, and the median step time (after the first step)."""
  mesh = sharding.make_mesh(c.mesh)
  ts = setup_lib.build_train_step(c, factory.build_model(c.model), mesh)
  state, losses, times = ts.init(), [], []
  with sharding.mesh_context(mesh):
    for b in batches:
      b = sharding.global_batch(b, mesh, leading_microbatch_axis=True)
      start = time.perf_counter()
      state, m = ts.step(state, b)
      losses.append(float(m['loss']))
      times.append(time.perf_counter() - start)
  return np.array(losses), float(np.median(times[1:])) if timed else None


def check_speed(accel: bool, preset: str):
  if not accel:
    row('train step speed xla vs pallas', 'SKIPPED',
        'CPU: Pallas runs only in interpret mode, which times the interpreter')
    return
  times = {}
  for impl in ('xla', 'pallas', 'auto'):
    c = _config(preset, attention_impl=impl, dtype='bfloat16')
    _, times[impl] = _train(c, _batches(c, 6), timed=True)
  targets = c.train.batch_size * c.model.max_len
  row('train step speed', 'INFO', ', '.join(f'{k} {targets / v:,.0f} targets/s'
                                             for k, v in times.items())
      + f' ({preset}, bf16, batch {c.train.batch_size} x {c.model.max_len}); '
      f'pallas/xla {times["xla"] / times["pallas"]:.2f}x')


def check_bf16_parity(steps: int, preset: str):
  c32 = _config(preset)
  batches = _batches(c32, steps)
  l32, _ = _train(c32, batches)
  l16, _ = _train(_config(preset, dtype='bfloat16'), batches)
  rel = float(np.max(np.abs(l16 - l32) / l32))
  row('bf16 loss parity', 'PASS' if rel < 0.02 else 'FAIL',
      f'{preset}, {steps} steps: f32 loss {l32[0]:.3f} -> {l32[-1]:.3f}, bf16 {l16[0]:.3f} -> '
      f'{l16[-1]:.3f}, max rel diff {rel:.2%} (tol 2%)')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=50, help='bf16 parity steps')
  p.add_argument('--preset', default=None, help='default: 10m on an accelerator, tiny on CPU')
  a = p.parse_args()
  backend = jax.default_backend()
  accel = backend in ('gpu', 'tpu')
  preset = a.preset or ('10m' if accel else 'tiny')
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind} ({backend}), jax '
        f'{jax.__version__}')
  check_attention(accel)
  check_chunked_ce()
  check_speed(accel, preset)
  check_bf16_parity(a.steps, preset)
  width = max(len(r[0]) for r in ROWS)
  print('\n' + '\n'.join(f'{c:<{width}}  {res:<7}  {d}' for c, res, d in ROWS))
  sys.exit(1 if any(r[1] == 'FAIL' for r in ROWS) else 0)


if __name__ == '__main__':
  main()
