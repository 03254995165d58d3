"""Sharded training equals single-device training: meshes, real shards, cross-mesh restore.

The 8-device checks run in one subprocess (XLA_FLAGS must be set before jax starts; the
pytest process has one CPU device), which writes its results for the tests to assert.
"""

import json
import pathlib
import sys
import time
import types

import numpy as np
import pytest

from tests.conftest import run_on_cpu_devices

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1))
STEPS = 3
CKPT_FROM, CKPT_TO, CKPT_AT = (2, 2, 2), (1, 8, 1), 2  # save after step 2 on one, resume on other


# ----------------------------------------------------------------------------- the subprocess


def _config():
  from configs import baseline  # pylint: disable=g-import-not-at-top
  c = baseline.get_config('tiny')
  # Tiny but shardable on every mesh: embed 32 / fsdp 8, heads 4 and kv heads 2 / tensor 2.
  # Dropout and grad accumulation on: neither may depend on the mesh.
  c.model.update(num_layers=1, hidden_dim=32, num_heads=4, num_kv_heads=2, ffn_dim=64,
                 max_len=16, vocab_size=64, dropout=0.1)
  # Adam's first steps are sign(g): a gradient element that cancels to ~0 would flip with
  # float32 summation order and move by +-lr. A larger eps damps exactly those elements,
  # so the comparison checks sharding, not the conditioning of Adam.
  c.train.update(batch_size=16, grad_accum=2, steps=STEPS, warmup_steps=0, lr=1e-2, eps=1e-4)
  return c


def _synthetic_batches(config, steps):
  """Per step: grad_accum x B x T batches in the docs' layout (two documents + padding a row)."""
  rng = np.random.default_rng(0)
  A, B, T, V = config.train.grad_accum, config.train.batch_size, config.model.max_len, \
      config.model.vocab_size
  out = []
  for _ in range(steps):
    first = rng.integers(3, T - 4, size=(A, B, 1))
    length = rng.integers(T - 3, T + 1, size=(A, B, 1))
    t = np.arange(T)[None, None]
    seg = np.where(t < first, 1, np.where(t < length, 2, 0)).astype(np.int32)
    pos = np.where(seg == 1, t, t - first) * (seg > 0)
    mask = (seg > 0).astype(np.float32)
    inputs = rng.integers(0, V, (A, B, T)).astype(np.int32)
    out.append(dict(inputs=inputs, targets=(inputs * 7 + 3) % V,  # learnable: loss must fall
                    segment_ids=seg, positions=pos.astype(np.int32), loss_mask=mask,
                    target_bytes=(rng.integers(1, 4, (A, B, T)) * mask).astype(np.int32)))
  return out


class _Run:
  """Model, optimizer and sharded jitted steps of one mesh."""

  def __init__(self, config, devices):
    from stlm.models import factory  # pylint: disable=g-import-not-at-top
    from stlm.train import setup, sharding  # pylint: disable=g-import-not-at-top
    self.config, self.sharding = config, sharding
    self.mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch(config.train.batch_size, self.mesh)
    # Exactly the trainer's construction: its state shardings, init and donating step.
    built = setup.build_train_step(config, factory.build_model(config.model), self.mesh)
    self.init, self.step, self.state_sh = built.init, built.step, built.state_shardings
    self.abstract = built.abstract_state

  def train(self, state, batches):
    import jax  # pylint: disable=g-import-not-at-top
    losses = []
    with self.sharding.mesh_context(self.mesh):
      for b in batches:
        state, m = self.step(state, self.sharding.global_batch(b, self.mesh, True))
        losses.append(float(jax.device_get(m['loss'])))
    return state, losses


def _flat(tree, prefix):
  import jax  # pylint: disable=g-import-not-at-top
  return {f'{prefix}/{jax.tree_util.keystr(p)}': np.asarray(jax.device_get(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _worker(out_dir: str) -> None:
  import grain  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from stlm.train import checkpoint  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  out = pathlib.Path(out_dir)
  config = _config()
  batches = _synthetic_batches(config, STEPS)
  results, arrays = {}, {}

  runs = {}  # one compiled _Run per mesh, reused by the checkpoint check

  def run(shape, devices):
    config.mesh.shape = shape
    start = time.perf_counter()
    r = runs[shape] = _Run(config, devices)
    if shape in ((1, 1, 1), CKPT_FROM):
      state = r.init()  # jit with out_shardings, as the trainer does
    else:  # the single-device init laid out on this mesh (saves compiling init 3 more times)
      state = jax.device_put(runs[(1, 1, 1)].init(), r.state_sh, may_alias=False)
    t_init = time.perf_counter()
    state, losses = r.train(state, batches)
    print(f'mesh {shape}: build+init {t_init - start:.1f}s, 3 steps '
          f'{time.perf_counter() - t_init:.1f}s', file=sys.stderr)
    return r, state, losses

  _, ref_state, ref_losses = run((1, 1, 1), jax.devices()[:1])
  results['reference'] = {'losses': ref_losses}
  arrays.update(_flat(ref_state.params, 'reference/params'))
  for shape in MESHES:
    name = 'x'.join(map(str, shape))
    r, state, losses = run(shape, None)
    results[name] = {'losses': losses, 'mesh': dict(r.mesh.shape),
                     'params': r.sharding.shard_shapes(state.params),
                     'opt_state': r.sharding.shard_shapes(state.opt_state)}
    arrays.update(_flat(state.params, f'{name}/params'))

  # Save on one mesh after CKPT_AT steps, restore onto another (state and data iterator).
  config.mesh.shape = CKPT_FROM
  src = runs[CKPT_FROM]
  state, losses_before = src.train(src.init(), batches[:CKPT_AT])
  data_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
  for _ in range(CKPT_AT):
    next(data_iter)
  ckpts = checkpoint.RunCheckpoints(str(out / 'run'), config, keep=2, async_save=False)
  ckpts.save(CKPT_AT, state, data_iter, force=True)
  ckpts.close()
  config.mesh.shape = CKPT_TO
  dst = runs[CKPT_TO]
  ckpts = checkpoint.RunCheckpoints(str(out / 'run'), config, keep=2, async_save=False)
  ckpts.check_config()  # a different mesh is still the same run
  fresh_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
  restored = ckpts.restore(dst.abstract, fresh_iter)
  ckpts.close()
  restored_shards = dst.sharding.shard_shapes(restored.params)
  restored_step = int(restored.step)  # before the step donates it
  state, losses_after = dst.train(restored, batches[CKPT_AT:])
  results['checkpoint'] = {'losses_before': losses_before, 'losses_after': losses_after,
                           'restored_step': restored_step, 'next_data': int(next(fresh_iter)),
                           'restored_params': restored_shards,
                           'restored_mesh': dict(dst.mesh.shape)}
  arrays.update(_flat(state.params, 'checkpoint/params'))
  np.savez(out / 'params.npz', **arrays)
  (out / 'results.json').write_text(json.dumps(results))


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
  out = tmp_path_factory.mktemp('sharding')
  # Cheap XLA CPU compiles (the subprocess compiles ten tiny programs); same flags for the
  # reference and the meshes, so the comparison is unaffected.
  run_on_cpu_devices(__file__, out, 8)
  results = json.loads((out / 'results.json').read_text())
  with np.load(out / 'params.npz') as z:
    arrays = dict(z)
  return results, arrays


def _params(arrays, prefix):
  return {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + '/')}


@pytest.mark.slow
@pytest.mark.parametrize('shape', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_mesh_matches_single_device(sharded, shape):
  results, arrays = sharded
  name = 'x'.join(map(str, shape))
  ref = results['reference']['losses']
  assert len(ref) == STEPS and ref[0] > ref[-1]  # it trains
  np.testing.assert_allclose(results[name]['losses'], ref, rtol=1e-5)
  want, got = _params(arrays, 'reference/params'), _params(arrays, f'{name}/params')
  assert want.keys() == got.keys() and len(want) > 10
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=5e-6, err_msg=k)


def _shard(shape, spec, mesh):
  return [d // np.prod([mesh[a] for a in axes]) if axes else d for d, axes in zip(shape, spec)]


@pytest.mark.slow
@pytest.mark.parametrize('shape', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_params_and_optimizer_really_sharded(sharded, shape):
  results, _ = sharded
  r = results['x'.join(map(str, shape))]
  mesh = r['mesh']
  assert mesh == dict(zip(('data', 'fsdp', 'tensor'), shape))
  # (global shape, logical -> mesh axes) of representative params; see LOGICAL_RULES.
  expect = {
      "['transformer']['block_0']['attn']['q_kernel']": ((32, 4, 8), (('fsdp',), ('tensor',), ())),
      "['transformer']['block_0']['attn']['k_kernel']": ((32, 2, 8), (('fsdp',), ('tensor',), ())),
      "['transformer']['block_0']['attn']['o_kernel']": ((4, 8, 32), (('tensor',), (), ('fsdp',))),
      "['transformer']['block_0']['ffn']['gate_kernel']": ((32, 64), (('fsdp',), ('tensor',))),
      "['transformer']['block_0']['ffn']['down_kernel']": ((64, 32), (('tensor',), ('fsdp',))),
      "['embed']['embedding']": ((64, 32), (('tensor',), ('fsdp',))),
      "['transformer']['final_norm']['scale']": ((32,), ((),)),
  }
  for path, (global_shape, spec) in expect.items():
    got_global, got_shards = r['params'][path]
    want_shard = _shard(global_shape, spec, mesh)
    assert tuple(got_global) == global_shape, path
    assert got_shards == [want_shard], (path, got_shards, want_shard)
    # AdamW's moments (mu, nu) live inside the chain's state: find them by the param path.
    moments = [v for k, v in r['opt_state'].items() if k.endswith(path)]
    assert len(moments) == 2, (path, list(r['opt_state'])[:6])
    assert all(m[1] == [want_shard] for m in moments), (path, moments)
  total = mesh['fsdp'] * mesh['tensor']
  if total > 1:  # something is really split: fewer elements per device than in the param
    q_global, q_shards = r['params']["['transformer']['block_0']['attn']['q_kernel']"]
    assert np.prod(q_shards[0]) * total == np.prod(q_global)


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(sharded):
  results, arrays = sharded
  c, ref = results['checkpoint'], results['reference']['losses']
  assert c['restored_step'] == CKPT_AT
  assert c['next_data'] == CKPT_AT  # the data iterator resumed where it was saved
  assert c['restored_mesh'] == dict(zip(('data', 'fsdp', 'tensor'), CKPT_TO))
  # Restored onto the new mesh's shardings (fsdp 8 splits embed 32 into 4).
  assert c['restored_params']["['embed']['embedding']"][1] == [[64, 4]]
  np.testing.assert_allclose(c['losses_before'], ref[:CKPT_AT], rtol=1e-5)
  np.testing.assert_allclose(c['losses_after'], ref[CKPT_AT:], rtol=1e-5)
  want, got = _params(arrays, 'reference/params'), _params(arrays, 'checkpoint/params')
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=5e-6, err_msg=k)


# --------------------------------------------------- checks that need no extra devices


def test_mesh_that_does_not_divide_the_devices_names_the_numbers():
  from stlm.train import sharding  # pylint: disable=g-import-not-at-top
  assert sharding.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  with pytest.raises(ValueError, match=r'multiply to 3, which does not divide the 8'):
    sharding.resolve_mesh_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match=r'\(2, 2, 1\) needs 4 devices but 8 are available'):
    sharding.resolve_mesh_shape((2, 2, 1), 8)


def test_batch_that_does_not_divide_the_data_axes_names_the_numbers():
  from stlm.train import sharding  # pylint: disable=g-import-not-at-top
  mesh = types.SimpleNamespace(shape={'data': 2, 'fsdp': 4, 'tensor': 1})
  sharding.check_batch(16, mesh)
  with pytest.raises(ValueError, match=r'batch_size=12 .* \(2 x 4 = 8 devices\).* 8 or 16'):
    sharding.check_batch(12, mesh)


def test_logical_rules_cover_every_param_axis():
  from stlm.models import factory  # pylint: disable=g-import-not-at-top
  from stlm.train import sharding  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  names = {n for n, _ in sharding.LOGICAL_RULES}
  for kind in ('baseline', 'byte_pool'):
    from configs import baseline, byte_pool  # pylint: disable=g-import-not-at-top
    cfg = (baseline if kind == 'baseline' else byte_pool).get_config('tiny').model
    cfg.vocab_size = 300
    specs = factory.logical_partition_specs(factory.build_model(cfg), cfg)
    used = {a for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec)) for a in s if a}
    assert used <= names, used - names


if __name__ == '__main__':
  _worker(sys.argv[1])
