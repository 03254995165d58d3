"""Populations: members parsed from one config, the vmapped step equal to single runs,
per-member hyper-parameters, a diverging member alone, and the whole run through main.py."""

import json
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stlm import config as config_lib
from stlm import export
from stlm.config import validate
from stlm.models import factory
from stlm.train import population
from stlm.train import setup as setup_lib
from stlm.train import sharding
from stlm.train import step as step_lib
from tests.conftest import require_shared_data
from tests.conftest import run_on_cpu_devices
from tests.main_runs import read_metrics
from tests.main_runs import run_main

T, B, MICRO = 32, 2, 2


def _config(**train):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.update(vocab_size=257, max_len=T, num_layers=1, hidden_dim=32, num_heads=2,
                 num_kv_heads=1, ffn_dim=64, dropout=0.1)
  c.train.update({'batch_size': B, 'grad_accum': MICRO, 'steps': 10, 'warmup_steps': 2,
                  **train})
  c.tokenizer.kind = 'bytes'
  return c


def _batches(seed, n_steps, rows=B):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n_steps):
    ids = rng.integers(1, 257, size=(MICRO, rows, T + 1)).astype(np.int32)
    out.append(dict(inputs=ids[..., :-1], targets=ids[..., 1:],
                    loss_mask=np.ones((MICRO, rows, T), np.float32),
                    target_bytes=np.ones((MICRO, rows, T), np.int32),
                    segment_ids=np.ones((MICRO, rows, T), np.int32),
                    positions=np.broadcast_to(np.arange(T, dtype=np.int32),
                                              (MICRO, rows, T)).copy()))
  return out


def test_members_take_seeds_and_overrides_and_become_single_run_configs():
  c = _config(population=3, population_overrides='train.lr=1e-3,2e-3,4e-3;model.dropout=0.1')
  c.seed = 7
  ms = population.members(c)
  assert [m.config.seed for m in ms] == [7, 8, 9]
  assert [m.config.train.lr for m in ms] == [1e-3, 2e-3, 4e-3]
  assert [m.config.model.dropout for m in ms] == [0.1] * 3
  assert [m.name for m in ms] == ['m0_seed7_lr0.001_dropout0.1', 'm1_seed8_lr0.002_dropout0.1',
                                  'm2_seed9_lr0.004_dropout0.1']
  assert ms[2].config.train.muon_lr == c.train.muon_lr   # read by Muon only
  c.train.optimizer = 'muon'
  assert population.members(c)[2].config.train.muon_lr == pytest.approx(
      c.train.muon_lr * 4e-3 / c.train.lr)
  for m in ms:   # a member's config is a single run's: no population keys left
    assert not population.enabled(m.config)
    assert m.config.train.population_data == 'own'
  c = _config(population_seeds='3,1')
  assert [m.config.seed for m in population.members(c)] == [3, 1]


@pytest.mark.parametrize('train,match', [
    (dict(population=2, population_overrides='train.b1=0.8'), r'population_overrides=.*train\.lr, train\.weight_decay, model\.dropout'),
    (dict(population=3, population_overrides='train.lr=1e-3,2e-3'), r'2 values for 3 members'),
    (dict(population_seeds='1,x'), r'population_seeds=.*comma list of integer'),
    (dict(population_seeds='1,1'), r'repeats a seed'),
    (dict(population=3, population_seeds='1,2'), r'population=3: disagrees with the 2 seeds'),
    (dict(population=2, population_data='mixed'), r'population_data=.*own, shared'),
    (dict(population=2, population_sharding='data'), r'population_sharding=.*replicated, members'),
    (dict(population=2, population_vmap_size=-1), r'population_vmap_size=-1: must be >= 0'),
    (dict(population=2, population_vmap_size=1, population_sharding='members'), r"population_vmap_size=1: .*population_sharding='replicated'"),
    (dict(population=2, eval_benchmarks='blimp'), r'eval_benchmarks=.*not run inside a population'),
    (dict(population=2, optimizer='muon', population_overrides='train.weight_decay=0,0.1'), r"only with train\.optimizer='adamw'"),
])
def test_bad_population_settings_name_the_key(train, match):
  with pytest.raises(validate.ConfigError, match=r'^config\.train\.' + '.*' + match):
    population.members(_config(**train))


def _single_run(config, batches):
  mesh = sharding.make_mesh(config.mesh)
  model = factory.build_model(config.model)
  ts = setup_lib.build_train_step(config, model, mesh)
  state, losses = ts.init(), []
  with sharding.mesh_context(mesh):
    for b in batches:
      state, m = ts.step(state, sharding.global_batch(b, mesh, True))
      losses.append(float(m['loss']))
  return state, losses


def _population(config, batches_per_member, poison=None):
  ms = population.members(config)
  mesh = sharding.make_mesh(config.mesh)
  model = factory.build_model(population.shared_model_config(ms))
  ps = population.build_population_step(config, ms, model, mesh)
  hp = population.hyperparameters(config, ms)
  state, active, losses = ps.init(), jnp.ones(len(ms), bool), []
  if poison is not None:
    members_states = [ps.unstack(state, i) for i in range(len(ms))]
    bad = members_states[poison]
    members_states[poison] = bad.replace(params=jax.tree.map(lambda x: x * jnp.nan, bad.params))
    state = ps.stack(members_states)
  with sharding.mesh_context(mesh):
    for step_batches in zip(*batches_per_member):
      stacked = {k: np.stack([b[k] for b in step_batches]) for k in step_batches[0]}
      state, m, active = ps.step(state, jax.device_put(stacked, ps.batch_sharding), hp, active)
      losses.append(np.asarray(m['loss']))
  return ms, ps, state, np.asarray(active), np.stack(losses, 1)


@pytest.mark.slow
def test_each_member_equals_the_single_run_of_its_config():
  c = _config(population=3, population_overrides='train.lr=1e-3,3e-3,1e-2;model.dropout=0.1,0,0.05;train.weight_decay=0.1,0,0.3')
  batches = [_batches(i, 4) for i in range(3)]
  ms, ps, state, active, losses = _population(c, batches)
  assert active.all()
  for i, m in enumerate(ms):
    single, single_losses = _single_run(m.config, batches[i])
    np.testing.assert_allclose(losses[i], single_losses, rtol=2e-6)
    got = jax.tree.leaves(ps.unstack(state, i).params)
    for a, b in zip(got, jax.tree.leaves(single.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-5)
  # The overrides reach their own member: the three learned different things.
  assert len({round(float(l[-1]), 5) for l in losses}) == 3


@pytest.mark.slow
def test_members_in_groups_one_after_another_train_as_one_vmap():
  batches = [_batches(i, 2) for i in range(3)]
  overrides = 'train.lr=1e-3,3e-3,1e-2;model.dropout=0.1,0,0.05'
  _, ps, state, active, losses = _population(_config(population=3,
                                                     population_overrides=overrides), batches)
  _, gps, grouped, gactive, glosses = _population(
      _config(population=3, population_overrides=overrides, population_vmap_size=2), batches)
  assert active.all() and gactive.all()
  np.testing.assert_allclose(glosses, losses, rtol=1e-6)
  for i in range(3):   # 3 members in groups of 2: the last group is the remainder
    for a, b in zip(jax.tree.leaves(gps.unstack(grouped, i).params),
                    jax.tree.leaves(ps.unstack(state, i).params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_diverging_member_stops_alone():
  c = _config(population=3)
  batches = [_batches(i, 3) for i in range(3)]
  _, ps, clean, clean_active, clean_losses = _population(c, batches)
  ms, ps2, state, active, losses = _population(c, batches, poison=1)
  assert clean_active.all() and active.tolist() == [True, False, True]
  for i in (0, 2):
    np.testing.assert_array_equal(losses[i], clean_losses[i])
    for a, b in zip(jax.tree.leaves(ps2.unstack(state, i).params),
                    jax.tree.leaves(ps.unstack(clean, i).params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  stopped = ps2.unstack(state, 1)   # frozen at the step it failed: nothing more applied
  assert int(stopped.step) == 1
  assert all(np.isnan(np.asarray(x)).all() for x in jax.tree.leaves(stopped.params))


def test_member_updates_are_adamw_at_the_members_rate_and_decay():
  params = {'w': jnp.arange(6.0).reshape(2, 3) / 7, 'b': jnp.ones(3)}
  grads = {'w': jnp.full((2, 3), 0.3), 'b': jnp.full(3, -0.2)}
  mask = {'w': True, 'b': False}
  def adamw(lr, wd):
    tx = optax.adamw(optax.constant_schedule(lr), weight_decay=wd, mask=mask)
    u, _ = tx.update(grads, tx.init(params), params)
    return u
  base, want = adamw(1e-2, 0.1), adamw(3e-2, 0.5)
  got = step_lib.member_updates(base, params, {'lr_scale': jnp.float32(3.0),
                                               'decay_delta': jnp.float32(0.4)}, 1e-2, mask)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6)


@pytest.mark.slow
def test_population_through_main_equals_single_runs_and_resumes(tmp_path):
  shared = require_shared_data()
  flags = ['--config.data.source=local', f'--config.data.path={shared / "corpus" / "tinystories"}',
           f'--config.data.data_dir={tmp_path / "tfds"}', '--config.train.warmup_steps=1',
           '--config.train.log_every=1', '--config.train.eval_every=2',
           '--config.train.ckpt_every=2', '--config.model.num_layers=1']
  pop = tmp_path / 'pop'
  run_main('configs/baseline.py', pop, *flags, '--config.train.population_seeds=0,1',
           '--config.train.population_overrides=train.lr=3e-3,1e-2', '--config.train.steps=2')
  run_main('configs/baseline.py', pop, *flags, '--config.train.population_seeds=0,1',
           '--config.train.population_overrides=train.lr=3e-3,1e-2', '--config.train.steps=4')
  summary = json.loads((pop / 'population.json').read_text())
  assert [m['status'] for m in summary['members']] == ['finished', 'finished']
  single = tmp_path / 'single'
  run_main('configs/baseline.py', single, *flags, '--config.seed=1', '--config.train.lr=1e-2',
           '--config.train.steps=4')
  member = pop / 'members' / 'm1_seed1_lr0.01'
  a = {r['step']: r['loss'] for r in read_metrics(member, 'train')}
  b = {r['step']: r['loss'] for r in read_metrics(single, 'train')}
  assert sorted(a) == [1, 2, 3, 4]
  for s in (3, 4):   # after the resume: the member goes on exactly as the single run
    assert a[s] == pytest.approx(b[s], rel=1e-5)
  got, want = export.load_export(str(member / 'export')), export.load_export(str(single / 'export'))
  assert got.config.to_dict() == want.config.to_dict()
  for x, y in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_member_sharding_needs_members_and_batches_that_split_over_the_mesh():
  mesh = types.SimpleNamespace(shape={'data': 4, 'fsdp': 2, 'tensor': 1})
  sharded = _config(population=4, population_sharding='members', batch_size=2)
  population.check_mesh(sharded, 4, mesh)    # 4 members over data, rows of 2 over fsdp
  with pytest.raises(ValueError, match=r'splits the 6 members over the mesh axis data \(4'):
    population.check_mesh(sharded, 6, mesh)
  sharded.train.batch_size = 3
  with pytest.raises(ValueError, match=r'batch_size=3 must be divisible by the fsdp mesh axes'):
    population.check_mesh(sharded, 4, mesh)
  with pytest.raises(ValueError, match=r'batch_size=2 must be divisible'):   # data x fsdp = 8
    population.check_mesh(_config(population=4, batch_size=2), 4, mesh)


def _placement_worker(out):
  """Runs a population of 4 on a (4, 1, 1) mesh, its member axis replicated and split."""
  results = {}
  for placement in population.SHARDINGS:
    c = _config(population=4, population_sharding=placement, batch_size=4,
                population_overrides='train.lr=1e-3,3e-3,1e-2,3e-2')
    c.mesh.shape = (4, 1, 1)
    batches = [_batches(seed, 3, rows=4) for seed in range(4)]
    _, ps, state, active, losses = _population(c, batches)
    shards = sharding.shard_shapes(state.params)
    results[placement] = dict(losses=losses.tolist(), active=active.tolist(),
                              shards={k: v[1] for k, v in shards.items()},
                              params=[np.asarray(x).tolist() for x in jax.tree.leaves(state.params)])
  (pathlib.Path(out) / 'placements.json').write_text(json.dumps(results))


@pytest.mark.slow
def test_members_split_over_the_mesh_train_as_the_replicated_population(tmp_path):
  run_on_cpu_devices(__file__, tmp_path, 4)
  got = json.loads((tmp_path / 'placements.json').read_text())
  rep, split = got['replicated'], got['members']
  assert rep['active'] == split['active'] == [True] * 4
  np.testing.assert_allclose(split['losses'], rep['losses'], rtol=1e-5)
  for a, b in zip(split['params'], rep['params']):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  for path, shapes in split['shards'].items():   # each device holds one member
    assert all(s[0] == 1 for s in shapes), (path, shapes)
  for path, shapes in rep['shards'].items():     # each device holds all four
    assert all(s[0] == 4 for s in shapes), (path, shapes)


if __name__ == '__main__':
  _placement_worker(sys.argv[1])
