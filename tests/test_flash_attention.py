"""Pallas flash attention (interpret mode on CPU) against the XLA reference.

Grid. The issue's grid is batch {1, 3} x kv heads {1, 2, H} x length {1, 17, 128, 300}
x head_dim {32, 64, 128} x causal x segment ids, and we add dtype {f32, bf16, f16} and
the lowering configuration {gpu, tpu} (layout, padding, block sizes differ). Each case
costs one XLA compile of three interpreted kernels (~4 s on a free core), so the full
product (1728 cases) is out of reach; instead `_pairwise` builds a covering set in which
every pair of values of any two factors occurs in some case (all-pairs testing: most
bugs need at most two interacting factors, e.g. causal x padded length, GQA x segments).
That is ~15 cases. STLM_FULL_KERNEL_GRID=1 runs the full product instead.
H = 4 so that kv heads 1, 2, 4 give groups of 4, 2 and 1 (plain multi-head).

Tolerances (max abs error over outputs and dq, dk, dv, relative to the largest
magnitude of the reference tensor):
- float32: both sides compute in float32 and differ only in summation order and the
  online-softmax rescaling, a few ulps per op over <= 300 keys: 2e-5 (observed <= 1.5e-6).
- bfloat16 / float16: the XLA reference itself rounds matmul outputs and probabilities
  to the input dtype, so both are compared with a float32 evaluation of the reference
  ("truth"): the kernel's error may be at most 2x XLA's own error plus 4 units of
  roundoff u of the dtype (rounding the output alone costs up to 1 u). Observed: bf16
  kernel <= 1.0 u (XLA about the same), f16 kernel <= 1.8 u (XLA <= 0.9 u; likely because the
  kernel rounds dS to f16 before dS @ K, where small dS values lose bits).
"""

import itertools
import os
import random
import re

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import attention as attention_lib
from kernels import block_sizes as bs
from kernels import flash_attention as fa
from kernels import flash_attention_fwd

HEADS = 4
FACTORS = {
    'batch': [1, 3],
    'kv_heads': [1, 2, HEADS],
    'length': [1, 17, 128, 300],
    'head_dim': [32, 64, 128],
    'causal': [True, False],
    'segments': [False, True],
    'dtype': ['float32', 'bfloat16', 'float16'],
    'backend': ['gpu', 'tpu'],
}
UNIT_ROUNDOFF = {'bfloat16': 2.0**-8, 'float16': 2.0**-11}


def _pairwise(factors, seed=0, tries=30):
  """All-pairs covering set: every value pair of any two factors occurs in some case.

  Randomised greedy (each new case covers as many uncovered pairs as it can), with a
  fixed seed so the set is the same on every run.
  """
  rng = random.Random(seed)
  names = list(factors)
  pairs_of = lambda case: {(a, case[a], b, case[b]) for a, b in itertools.combinations(names, 2)
                           if a in case and b in case}
  uncovered = {(a, i, b, j) for a, b in itertools.combinations(names, 2)
               for i in range(len(factors[a])) for j in range(len(factors[b]))}
  cases = []
  while uncovered:
    best = None
    for _ in range(tries):
      a, i, b, j = rng.choice(sorted(uncovered))
      case = {a: i, b: j}
      for n in rng.sample(names, len(names)):
        if n not in case:
          values = rng.sample(range(len(factors[n])), len(factors[n]))
          case[n] = max(values, key=lambda v: len(pairs_of({**case, n: v}) & uncovered))
      case = {n: case[n] for n in names}
      if best is None or len(pairs_of(case) & uncovered) > len(pairs_of(best) & uncovered):
        best = case
    uncovered -= pairs_of(best)
    cases.append(best)
  return [{n: factors[n][c[n]] for n in names} for c in cases]


def _cases():
  if os.environ.get('STLM_FULL_KERNEL_GRID') == '1':
    return [dict(zip(FACTORS, vals)) for vals in itertools.product(*FACTORS.values())]
  return _pairwise(FACTORS)


def _case_id(c):
  return (f"b{c['batch']}-k{c['kv_heads']}-t{c['length']}-d{c['head_dim']}-"
          f"{'causal' if c['causal'] else 'full'}-{'seg' if c['segments'] else 'noseg'}-"
          f"{c['dtype']}-{c['backend']}")


def _reference(q, k, v, q_seg, kv_seg, causal):
  b, t = q.shape[:2]
  mask = None
  if causal or q_seg is not None:
    mask = attention_lib.make_mask(q_seg, kv_seg, causal, t, k.shape[1], b)
  return attention_lib.xla_attention(q, k, v, mask)


def _inputs(batch, q_len, kv_len, kv_heads, head_dim, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, q_len, HEADS, head_dim), jnp.float32)
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32)
  do = jax.random.normal(keys[3], (batch, q_len, HEADS, head_dim), jnp.float32)
  return [x.astype(dtype) for x in (q, k, v, do)]


def _packed_segments(batch, length, seed=0):
  """Sorted document ids 1..3 with trailing padding 0, like the packing pipeline makes."""
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.integers(1, 4, size=(batch, length)), axis=1)
  ids[:, length - length // 8:] = 0
  return jnp.asarray(ids, jnp.int32)


def _out_and_grads(fn, q, k, v, do):
  o, vjp = jax.vjp(fn, q, k, v)
  return (o, *vjp(do))


@pytest.fixture(autouse=True, scope='module')
def _cheap_compiles():
  """Interpret-mode cost is almost all XLA compile time; skipping LLVM's expensive passes
  cuts it by ~40% and does not change what is computed."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


@jax.jit(static_argnames=('causal', 'backend', 'blocks'))
def _kernel_and_reference(q, k, v, do, q_seg, kv_seg, *, causal, backend, blocks=None):
  """(kernel, reference in dtype, reference in float32) outputs and gradients, one compile."""
  kernel = _out_and_grads(lambda q, k, v: fa.flash_attention(
      q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal, backend=backend,
      block_sizes=blocks), q, k, v, do)
  ref_fn = lambda q, k, v: _reference(q, k, v, q_seg, kv_seg, causal)
  ref = _out_and_grads(ref_fn, q, k, v, do)
  if q.dtype == jnp.float32:
    return kernel, ref, ref
  truth = _out_and_grads(ref_fn, *(x.astype(jnp.float32) for x in (q, k, v, do)))
  return kernel, ref, truth


def _assert_close(kernel, ref, truth, dtype):
  for name, got, want_lowp, want in zip(('out', 'dq', 'dk', 'dv'), kernel, ref, truth):
    got, want_lowp, want = (np.asarray(x, np.float64) for x in (got, want_lowp, want))
    assert np.all(np.isfinite(got)), f'{name}: non-finite values'
    scale = max(1.0, np.max(np.abs(want)))
    err = np.max(np.abs(got - want)) / scale
    if dtype == 'float32':
      assert err <= 2e-5, f'{name}: relative error {err:.2e} > 2e-5'
    else:
      xla_err = np.max(np.abs(want_lowp - want)) / scale
      bound = 2 * xla_err + 4 * UNIT_ROUNDOFF[dtype]
      assert err <= bound, (f'{name}: error {err:.2e} > {bound:.2e} '
                            f'(XLA {dtype} error {xla_err:.2e})')


def _fast_case(c):
  """The cases the fast loop (-m 'not slow') keeps: float32, one row, at most 17 keys."""
  return c['dtype'] == 'float32' and c['batch'] == 1 and c['length'] <= 17


@pytest.mark.parametrize('case', [
    c if _fast_case(c) else pytest.param(c, marks=pytest.mark.slow, id=_case_id(c))
    for c in _cases()], ids=_case_id)
def test_matches_reference(case):
  c = case
  q, k, v, do = _inputs(c['batch'], c['length'], c['length'], c['kv_heads'], c['head_dim'],
                        c['dtype'])
  q_seg = kv_seg = None
  if c['segments']:
    q_seg = kv_seg = _packed_segments(c['batch'], c['length'])
  kernel, ref, truth = _kernel_and_reference(q, k, v, do, q_seg, kv_seg, causal=c['causal'],
                                             backend=c['backend'])
  assert kernel[0].dtype == q.dtype and kernel[1].dtype == q.dtype
  _assert_close(kernel, ref, truth, c['dtype'])


def test_covering_set_covers_every_pair():
  cases = _pairwise(FACTORS)
  for a, b in itertools.combinations(FACTORS, 2):
    seen = {(c[a], c[b]) for c in cases}
    assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)
  assert len(cases) <= 20


@pytest.mark.slow
def test_fully_masked_rows_give_zeros():
  """Queries whose segment has no key, and causal queries before the first key (T > S)."""
  # Segment 9 exists only among the queries: rows 30.. of batch 1 see nothing.
  q, k, v, do = _inputs(2, 40, 40, 1, 32, jnp.float32, seed=1)
  q_seg = jnp.ones((2, 40), jnp.int32).at[1, 30:].set(9)
  kv_seg = jnp.ones((2, 40), jnp.int32)
  kernel, ref, truth = _kernel_and_reference(q, k, v, do, q_seg, kv_seg, causal=True,
                                             backend='gpu')
  _assert_close(kernel, ref, truth, 'float32')
  out, dq = kernel[0], kernel[1]
  assert np.all(np.asarray(out[1, 30:]) == 0) and np.all(np.asarray(dq[1, 30:]) == 0)
  assert np.all(np.asarray(out[1, :30]) != 0) and np.all(np.asarray(out[0]) != 0)

  # Causal with more queries than keys: query i sees keys j <= i - 5, rows 0..4 see none.
  q, k, v, do = _inputs(1, 8, 3, 2, 32, jnp.bfloat16, seed=2)
  kernel, ref, truth = _kernel_and_reference(q, k, v, do, None, None, causal=True,
                                             backend='tpu')
  _assert_close(kernel, ref, truth, 'bfloat16')
  assert np.all(np.asarray(kernel[0][:, :5], np.float32) == 0)
  assert np.all(np.asarray(kernel[1][:, :5], np.float32) == 0)
  assert np.all(np.asarray(kernel[0][:, 5:], np.float32) != 0)


@pytest.mark.slow
def test_decode_shape_queries_are_last_keys():
  """T < S (a cache): query i is key S - T + i; causal and segment masks both apply."""
  q, k, v, do = _inputs(2, 5, 37, 2, 64, jnp.float32, seed=3)
  q_seg = jnp.array([[1, 1, 2, 2, 2], [1, 1, 1, 1, 1]], jnp.int32)
  kv_seg = jnp.concatenate([jnp.ones((2, 34), jnp.int32), q_seg[:, 2:]], axis=1)
  kernel, ref, truth = _kernel_and_reference(q, k, v, do, q_seg, kv_seg, causal=True,
                                             backend='gpu')
  _assert_close(kernel, ref, truth, 'float32')


@pytest.mark.slow
def test_odd_head_dim_and_small_blocks():
  """head_dim 20 (the 10m preset; padded to 32 on GPU) and 16-row blocks: many blocks."""
  q, k, v, do = _inputs(1, 70, 70, 2, 20, jnp.float32, seed=4)
  seg = _packed_segments(1, 70, seed=4)
  blocks = bs.BlockSizes(16, 16, 16, 32, 32, 16)
  kernel, ref, truth = _kernel_and_reference(q, k, v, do, seg, seg, causal=True, backend='gpu',
                                             blocks=blocks)
  _assert_close(kernel, ref, truth, 'float32')


@pytest.mark.slow
def test_tpu_faithful_interpreter():
  """The TPU configuration under Pallas' TPU interpreter, which models VMEM/HBM, raises
  on out-of-bounds block reads, fills uninitialised memory with NaN and detects races."""
  q, k, v, do = _inputs(1, 40, 40, 2, 64, jnp.float32, seed=5)
  seg = _packed_segments(1, 40, seed=5)
  params = pltpu.InterpretParams(detect_races=True)
  fn = jax.jit(lambda q, k, v: fa.flash_attention(
      q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, backend='tpu',
      interpret=params))
  kernel = _out_and_grads(fn, q, k, v, do)
  ref = _out_and_grads(lambda q, k, v: _reference(q, k, v, seg, seg, True), q, k, v, do)
  _assert_close(kernel, ref, ref, 'float32')
  # InterpretParams documents this module-level state as where detected races are recorded.
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
  assert interpret_pallas_call.races is not None
  assert not interpret_pallas_call.races.races_found


BAD_INPUTS = [
    (dict(q=(2, 8, 4)), ValueError, 'q must be 4-D'),
    (dict(q_dtype=jnp.int32), TypeError, 'q dtype int32 unsupported; supported: bfloat16'),
    (dict(k_dtype=jnp.float16), TypeError, 'must share one dtype'),
    (dict(q=(2, 8, 4, 8), k=(2, 8, 2, 8), v=(2, 8, 2, 8)), ValueError,
     'head_dim (q.shape[3]) 8 unsupported; supported: 16 to 256'),
    (dict(q=(2, 8, 4, 512), k=(2, 8, 2, 512), v=(2, 8, 2, 512)), ValueError, '16 to 256'),
    (dict(q=(2, 8, 3, 32)), ValueError,
     'query heads (q.shape[2]) 3 must be a multiple of kv heads (k.shape[2]) 2'),
    (dict(v=(2, 9, 2, 32)), ValueError, 'v shape (2, 9, 2, 32) must equal k shape'),
    (dict(k=(3, 8, 2, 32), v=(3, 8, 2, 32)), ValueError, 'k batch 3 must equal q batch 2'),
    (dict(q_seg=(2, 8)), ValueError, 'both q_segment_ids and kv_segment_ids'),
    (dict(q_seg=(2, 7), kv_seg=(2, 8)), ValueError, 'q_segment_ids shape (2, 7) must be (2, 8)'),
    (dict(q_seg=(2, 8), kv_seg=(2, 8), seg_dtype=jnp.float32), TypeError,
     'q_segment_ids dtype float32 unsupported; supported: integer'),
    (dict(causal=1), TypeError, 'causal must be a bool'),
    (dict(backend='cuda'), ValueError, "backend 'cuda' unknown"),
    (dict(blocks=bs.BlockSizes(128, 64, 128, 128, 128, 128), backend='tpu'), ValueError,
     'block_sizes.block_k=64 unsupported on tpu; supported: a power of two >= 128'),
    (dict(blocks=bs.BlockSizes(128, 64, 48, 64, 64, 64)), ValueError,
     'block_sizes.block_q_dq=48 unsupported on gpu; supported: a power of two >= 16'),
    (dict(q=(1, 2**16, 4, 128), k=(1, 2**16, 2, 128), v=(1, 2**16, 2, 128), backend='tpu'),
     ValueError, 'MiB of TPU VMEM'),
]


@pytest.mark.parametrize('spec,error,message', BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_fails_before_tracing(spec, error, message, monkeypatch):
  def no_kernels(*args, **kwargs):
    raise AssertionError('a kernel was traced before the input was rejected')
  monkeypatch.setattr(flash_attention_fwd.pl, 'pallas_call', no_kernels)
  shape = lambda name, default: jax.ShapeDtypeStruct(spec.get(name, default),
                                                     spec.get(f'{name}_dtype', jnp.float32))
  q, k, v = shape('q', (2, 8, 4, 32)), shape('k', (2, 8, 2, 32)), shape('v', (2, 8, 2, 32))
  seg = lambda name: (jax.ShapeDtypeStruct(spec[name], spec.get('seg_dtype', jnp.int32))
                      if name in spec else None)
  with pytest.raises(error, match=re.escape(message)):
    # eval_shape traces without running, so any kernel would hit no_kernels.
    jax.eval_shape(lambda q, k, v: fa.flash_attention(
        q, k, v, q_segment_ids=seg('q_seg'), kv_segment_ids=seg('kv_seg'),
        causal=spec.get('causal', True), backend=spec.get('backend'),
        block_sizes=spec.get('blocks')), q, k, v)


def test_supports_reports_reason():
  assert fa.supports((2, 128, 8, 64), (2, 128, 2, 64), jnp.bfloat16) is None
  assert 'head_dim' in fa.supports((2, 128, 8, 8), (2, 128, 2, 8), jnp.bfloat16)
  assert 'dtype' in fa.supports((2, 128, 8, 64), (2, 128, 2, 64), jnp.float64)


@pytest.mark.slow
def test_entry_point_dispatches_to_pallas():
  """attention(impl='pallas') at the tiny preset's head shape (H=4, K=2, head_dim 16)."""
  q, k, v, _ = _inputs(1, 17, 17, 2, 16, jnp.float32)
  got = attention_lib.attention(q, k, v, causal=True, impl='pallas')
  want = attention_lib.attention(q, k, v, causal=True, impl='xla')
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)


@pytest.mark.parametrize('backend,platform', [('gpu', 'cuda'), ('tpu', 'tpu')])
def test_lowers_for_accelerator(backend, platform):
  """Forward and backward lower to Triton / Mosaic IR (compiling needs the device)."""
  q = jax.ShapeDtypeStruct((2, 300, 4, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 300, 2, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)

  def loss(q, k, v, seg):
    o = fa.flash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True,
                           interpret=False, backend=backend)
    return o.astype(jnp.float32).sum()

  checks = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
                               disabled_checks=checks if platform == 'cuda' else [])(q, k, k, seg)
  text = exported.mlir_module()
  assert text.count('tpu_custom_call' if platform == 'tpu' else 'xla.gpu.triton') == 3
