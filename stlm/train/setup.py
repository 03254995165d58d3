"""Train-state construction: sharded init and the jitted, donating train step of a config.

Shared by the training loop, the step benchmark and the sharding tests, so all three run
exactly the trainer's construction.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from stlm.models import factory
from stlm.train import distill
from stlm.train import optimizer as optimizer_lib
from stlm.train import sharding
from stlm.train import state as state_lib
from stlm.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """The jitted pieces of training on one mesh (shared by the loop, benchmarks and tests).

  Call `step` under `sharding.mesh_context(mesh)`: the models' activation constraints resolve
  to it at trace time. `step` donates the state it is given.
  """
  init: Callable[[], state_lib.TrainState]   # a freshly initialised state on the mesh
  step: Callable                            # (state, stacked micro-batches) -> (state, metrics)
  state_shardings: state_lib.TrainState
  abstract_state: state_lib.TrainState       # shapes + shardings: what a checkpoint restores onto
  teacher: object = None                     # distill.Teacher when train.distill has one


def build_train_step(config, model, mesh) -> TrainStep:
  """Sharded init and the donating train step of `config` on `mesh`.

  Call it outside `sharding.mesh_context`: the shardings come from an abstract init that the
  logical rules would otherwise constrain.
  """
  # Weight decay follows each param's logical axis names (norms, tables: none).
  boxed = jax.eval_shape(lambda: factory.init_boxed_params(model, config.model, jax.random.key(0)))
  tx = optimizer_lib.make_optimizer(config.train, optimizer_lib.param_axes(boxed))
  schedule = optimizer_lib.make_schedule(config.train)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))

  def init_state():
    params = factory.init_params(model, config.model, init_rng)
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), rng=dropout_rng)

  abstract_init = jax.eval_shape(init_state)   # traced once: shapes for shardings and restore
  state_shardings = _state_shardings(boxed, mesh, abstract_init)
  jitted_init = jax.jit(init_state, out_shardings=state_shardings)

  def init():
    with sharding.mesh_context(mesh):
      return jitted_init()

  batch_sharding = sharding.batch_sharding(mesh, leading_microbatch_axis=True)
  teacher = distill.Teacher.load(config) if distill.enabled(config) else None
  step_fn = functools.partial(
      step_lib.train_step, model=model, tx=tx, schedule=schedule,
      skip_nonfinite=config.train.get('nonfinite_policy', 'stop') == 'skip',
      dropout_schedule=optimizer_lib.make_dropout_schedule(config.train),
      teacher=None if teacher is None else (teacher.model, config.train.distill, config.model))
  if teacher is None:
    train_fn = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, None), donate_argnums=0)
  else:
    # The teacher's parameters: a jit argument (not constants of the program), placed once,
    # sharded by their logical axes like the student's.
    teacher_sh = sharding.param_shardings(teacher.boxed_abstract, mesh)
    teacher_params = jax.device_put(teacher.params, teacher_sh)
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, teacher_sh),
                     out_shardings=(state_shardings, None), donate_argnums=0)
    train_fn = lambda state, batches: jitted(state, batches, teacher_params)
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          abstract_init, state_shardings)
  return TrainStep(init=init, step=train_fn, state_shardings=state_shardings,
                   abstract_state=abstract, teacher=teacher)


def _state_shardings(boxed, mesh, abstract):
  """Params sharded by their logical axes, optimizer moments like their params, rest replicated."""
  param_sh = sharding.param_shardings(boxed, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_sh = sharding.opt_state_shardings(abstract.opt_state, abstract.params, param_sh, mesh)
  return state_lib.TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)
