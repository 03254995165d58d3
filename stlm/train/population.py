"""Populations: N models of one config trained in one compiled step.

`train.population = N` trains the seeds seed, seed+1, ..., seed+N-1 (or the list
`train.population_seeds`), and `train.population_overrides` gives members their own
scalar hyper-parameters, one value per member or one for all:
`'train.lr=1e-3,3e-3,1e-2;model.dropout=0,0.1,0.1'`. Parameters and optimizer states are
stacked on a leading member axis and the train step is `vmap`ped over it.

A member is a single run: `members()` gives each its own config (the base config with its
seed and overrides, the population keys back at their defaults), its own directory
`<workdir>/members/<name>/` with metrics.jsonl, run.json, checkpoints and export, and, with
`train.population_data='own'` (the default), its own data order from its seed. So a member's
export is the export of `main.py` run with the member's config, to float32 rounding.
`'shared'` feeds every member the population seed's batches instead (one data pipeline).
`train.population_sharding='members'` splits the member axis over the mesh's data axis
(devices to spare hold their own members) instead of replicating it (`SHARDINGS`).
`train.population_vmap_size = k` vmaps k members at a time and runs the groups one after
another in the same step (`lax.map`); 0 vmaps them all.

Overridable keys (`OVERRIDES`) are traced inside the step, so members differ without a
recompilation: `train.lr` scales the member's updates (its schedule is the shared one
times the ratio: every schedule is proportional to its peak; with Muon, the member's
`train.muon_lr` is scaled by the same ratio),
`train.weight_decay` adds the difference of AdamW's decoupled decay, `model.dropout`
scales the model's dropout rates. Everything else is one value for the whole population.

A member whose step is not finite stops there (its parameters are the last finite ones; its
run ends as diverged, with no export) while the others go on; with
`train.nonfinite_policy='skip'` it skips that step instead, as a single run does.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stlm.config import errors
from stlm.config import schema
from stlm.models import chunked_ce
from stlm.train import optimizer as optimizer_lib
from stlm.train import sharding
from stlm.train import state as state_lib
from stlm.train import step as step_lib

DATA_MODES = ('own', 'shared')
# Where the member axis lives on the mesh: the mesh axis it is split over (None: every device
# holds every member, and each member's batch splits over data x fsdp as a single run's does).
# With 'members', N / data members train on each group of fsdp x tensor devices with their
# whole batch, so members never exchange gradients.
SHARDINGS = {'replicated': None, 'members': 'data'}
# Keys a member may set for itself, each traced in the step: how it is applied.
OVERRIDES = {
    'train.lr': 'scales the updates',
    'train.weight_decay': "adds the difference of AdamW's decoupled decay",
    'model.dropout': 'scales the dropout rates',
}
_POPULATION_KEYS = ('train.population', 'train.population_seeds', 'train.population_overrides',
                    'train.population_data', 'train.population_sharding',
                    'train.population_vmap_size')
MEMBERS_DIR = 'members'


@dataclasses.dataclass(frozen=True)
class Member:
  index: int
  name: str                          # its directory under <workdir>/members/
  config: ml_collections.ConfigDict  # the single run it is


def enabled(config) -> bool:
  t = config.train
  return int(t.get('population', 0)) > 0 or bool(str(t.get('population_seeds', '')).strip())


def _seeds(config) -> list[int]:
  t = config.train
  text = str(t.population_seeds).strip()
  if text:
    try:
      seeds = [int(s) for s in text.split(',') if s.strip()]
    except ValueError:
      errors.fail('train.population_seeds', t.population_seeds,
                  'must be a comma list of integer seeds, e.g. 0,1,2,3')
    if int(t.population) not in (0, len(seeds)):
      errors.fail('train.population', t.population,
                  f'disagrees with the {len(seeds)} seeds of train.population_seeds')
  else:
    if int(t.population) < 0:
      errors.fail('train.population', t.population, 'must be >= 0 (0 = a single run)')
    seeds = [int(config.seed) + i for i in range(int(t.population))]
  if len(set(seeds)) != len(seeds):
    errors.fail('train.population_seeds', t.population_seeds, 'repeats a seed')
  return seeds


def _overrides(config, n: int) -> dict[str, list[float]]:
  """{key: one value per member} from train.population_overrides."""
  text = str(config.train.population_overrides).strip()
  out = {}
  for part in (p.strip() for p in text.split(';') if p.strip()):
    key, eq, values = part.partition('=')
    key = key.strip()
    if not eq or key not in OVERRIDES:
      errors.fail('train.population_overrides', text,
                  f'{part!r} is not <key>=<values>; the keys a member may set are '
                  f'{", ".join(OVERRIDES)}')
    try:
      vals = [float(v) for v in values.split(',') if v.strip()]
    except ValueError:
      errors.fail('train.population_overrides', text, f'{key}: values must be numbers')
    if len(vals) == 1:
      vals = vals * n
    if len(vals) != n:
      errors.fail('train.population_overrides', text,
                  f'{key} has {len(vals)} values for {n} members (give one, or one each)')
    out[key] = vals
  return out


def _label(value: float) -> str:
  return f'{value:g}'


def members(config) -> list[Member]:
  """Every member as its own run's config (ConfigErrors name the population key at fault)."""
  t = config.train
  if t.population_data not in DATA_MODES:
    errors.fail('train.population_data', t.population_data, f'must be one of {", ".join(DATA_MODES)}')
  if t.population_sharding not in SHARDINGS:
    errors.fail('train.population_sharding', t.population_sharding,
                f'must be one of {", ".join(SHARDINGS)}')
  if int(t.population_vmap_size) < 0:
    errors.fail('train.population_vmap_size', t.population_vmap_size,
                'must be >= 0 (0: every member in one vmap)')
  if int(t.population_vmap_size) and member_axis(config) is not None:
    errors.fail('train.population_vmap_size', t.population_vmap_size,
                "groups members one after another; use it with population_sharding='replicated'")
  if t.distill.get('teacher', ''):
    errors.fail('train.distill.teacher', t.distill.teacher,
                'is not used inside a population; distil single runs')
  if str(t.get('eval_benchmarks', '')).strip():
    errors.fail('train.eval_benchmarks', t.eval_benchmarks,
                'is not run inside a population; score the members\' exports with stlm.eval')
  seeds = _seeds(config)
  overrides = _overrides(config, len(seeds))
  if 'train.weight_decay' in overrides and t.optimizer != 'adamw':
    errors.fail('train.population_overrides', t.population_overrides,
                "train.weight_decay differs per member only with train.optimizer='adamw'")
  if 'train.lr' in overrides and (float(t.lr) <= 0 or min(overrides['train.lr']) <= 0):
    errors.fail('train.population_overrides', t.population_overrides,
                'train.lr must be > 0 for every member and in the base config')
  base = ml_collections.ConfigDict(config.to_dict())
  # A member is a single run: its population keys go back to the schema's defaults.
  schema_train = schema.base_config().train
  defaults = {key: schema_train[key.split('.')[1]] for key in _POPULATION_KEYS}
  out = []
  for i, seed in enumerate(seeds):
    c = ml_collections.ConfigDict(base.to_dict())
    for key, value in defaults.items():
      section, name = key.split('.')
      c[section][name] = value
    c.seed = seed
    label = [f'm{i}', f'seed{seed}']
    for key, vals in overrides.items():
      section, name = key.split('.')
      c[section][name] = vals[i]
      label.append(f'{name}{_label(vals[i])}')
    if 'train.lr' in overrides and t.optimizer == 'muon':   # it scales with the member's rate
      c.train.muon_lr = float(t.muon_lr) * overrides['train.lr'][i] / float(t.lr)
    out.append(Member(i, '_'.join(label), c))
  return out


def hyperparameters(config, members_list: list[Member]) -> dict[str, np.ndarray]:
  """The per-member traced values of the step: lr_scale, decay_delta, dropout_factor."""
  t = config.train
  hp = {'lr_scale': np.array([m.config.train.lr / t.lr for m in members_list], np.float32)}
  if any(m.config.train.weight_decay != t.weight_decay for m in members_list):
    hp['decay_delta'] = np.array([m.config.train.weight_decay - t.weight_decay
                                  for m in members_list], np.float32)
  rates = [float(m.config.model.dropout) for m in members_list]
  if len(set(rates)) > 1:
    hp['dropout_factor'] = np.array([r / max(rates) for r in rates], np.float32)
  return hp


def shared_model_config(members_list: list[Member]) -> ml_collections.ConfigDict:
  """The model every member runs: its dropout is the largest member's (the others scale it)."""
  c = ml_collections.ConfigDict(members_list[0].config.model.to_dict())
  c.dropout = max(float(m.config.model.dropout) for m in members_list)
  return c


def member_axis(config):
  """The mesh axis the member axis is split over, or None (replicated)."""
  return SHARDINGS[config.train.population_sharding]


def check_mesh(config, n_members: int, mesh) -> None:
  """ValueError unless the members and each member's batch split evenly over the mesh."""
  axis = member_axis(config)
  if axis is None:
    sharding.check_batch(config.train.batch_size, mesh)
    return
  shape = dict(mesh.shape)
  if n_members % shape[axis]:
    raise ValueError(f"config.train.population_sharding='members' splits the {n_members} "
                     f'members over the mesh axis {axis} ({shape[axis]} devices): make the '
                     f'population a multiple of {shape[axis]}, or set mesh.shape')
  rest = [a for a in sharding.BATCH_AXES if a != axis]
  rows = int(np.prod([shape[a] for a in rest]))
  if int(config.train.batch_size) % rows:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} must be divisible by '
                     f'the {" x ".join(rest)} mesh axes ({rows} devices): each member\'s '
                     'batch splits over them')


def _stacked(sh, mesh, axis):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis, *sh.spec))


@dataclasses.dataclass(frozen=True)
class PopulationStep:
  init: object            # () -> stacked TrainState
  step: object            # (state, batches, hp, active) -> (state, metrics, active)
  member_abstract: state_lib.TrainState   # one member's state: what its checkpoint restores onto
  stack: object           # [member states] -> stacked state on the mesh
  unstack: object         # (stacked state, i) -> member i's state
  batch_sharding: jax.sharding.NamedSharding   # of the batches `step` takes


def build_population_step(config, members_list: list[Member], model, mesh) -> PopulationStep:
  """The vmapped, donating train step of the population on `mesh`, its member axis placed
  as `train.population_sharding` says."""
  from stlm.models import factory  # pylint: disable=g-import-not-at-top
  from stlm.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  t = members_list[0].config.train
  single = setup_lib.build_train_step(members_list[0].config, model, mesh)
  boxed = jax.eval_shape(lambda: factory.init_boxed_params(model, config.model, jax.random.key(0)))
  axes = optimizer_lib.param_axes(boxed)
  base_train = ml_collections.ConfigDict(config.train.to_dict())
  tx = optimizer_lib.make_optimizer(base_train, axes)
  schedule = optimizer_lib.make_schedule(base_train)
  mask = optimizer_lib.decay_mask(axes, base_train.weight_decay_params)
  skip = t.get('nonfinite_policy', 'stop') == 'skip'
  step_fn = functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule,
                              skip_nonfinite=True, member=None, decay_mask=mask,
                              dropout_schedule=optimizer_lib.make_dropout_schedule(base_train))

  def member_step(state, batches, hp, active):
    # The objective is exactly the training loss (a population never distils), so the output
    # layer's speculated gradients hold without their run-time check.
    with chunked_ce.trusted_training_cotangent():
      new, metrics = step_fn(state, batches, member=hp)
    keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(active, a, b), n, o)
    new = new.replace(step=keep(new.step, state.step), params=keep(new.params, state.params),
                      opt_state=keep(new.opt_state, state.opt_state))
    finite = metrics['nonfinite'] == 0
    return new, metrics, active & (finite | skip)

  keys = jnp.stack([jax.random.split(jax.random.key(m.config.seed)) for m in members_list])

  def init_one(key_pair):
    params = factory.init_params(model, config.model, key_pair[0])
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), rng=key_pair[1])

  axis = member_axis(config)
  # A member's own constraints (batch over data x fsdp) leave the members' axis to vmap.
  rules = sharding.LOGICAL_RULES if axis is None else sharding.without_axis(
      sharding.LOGICAL_RULES, axis)
  shardings = jax.tree.map(lambda sh: _stacked(sh, mesh, axis), single.state_shardings)
  init_jit = jax.jit(jax.vmap(init_one, spmd_axis_name=axis), out_shardings=shardings)
  own = config.train.population_data == 'own'
  batch_sh = sharding.batch_sharding(mesh, leading_microbatch_axis=True,
                                     batch_axes=tuple(a for a in sharding.BATCH_AXES if a != axis))
  batch_sh = _stacked(batch_sh, mesh, axis) if own else batch_sh
  group = int(config.train.population_vmap_size)
  if group and group < len(members_list):
    # Members in groups of `group`, vmapped within a group, the groups one after another:
    # on a CPU a batched matmul over every member can be slower than a loop over them.
    def vstep(state, batches, hp, active):
      each = lambda xs: member_step(xs[0], xs[1] if own else batches, xs[2], xs[3])
      return jax.lax.map(each, (state, batches if own else None, hp, active), batch_size=group)
  else:
    vstep = jax.vmap(member_step, in_axes=(0, 0 if own else None, 0, 0), spmd_axis_name=axis)
  step_jit = jax.jit(vstep, in_shardings=(shardings, batch_sh, None, None),
                     out_shardings=(shardings, None, None), donate_argnums=0)

  def init():
    with sharding.mesh_context(mesh, rules):
      return init_jit(keys)

  def step(state, batches, hp, active):
    with sharding.mesh_context(mesh, rules):   # the rules the step is traced under
      return step_jit(state, batches, hp, active)

  def stack(states):
    return jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *states), shardings)

  def unstack(state, i):
    return jax.tree.map(lambda x: x[i], state)

  return PopulationStep(init=init, step=step, member_abstract=single.abstract_state,
                        stack=stack, unstack=unstack, batch_sharding=batch_sh)
