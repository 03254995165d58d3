"""The device mesh and the one place that maps logical axis names to mesh axes.

Mesh axes (config.mesh.axes): `data` (pure data parallel: params replicated), `fsdp` (data
parallel with params and optimizer state sharded along their `embed` axis, gathered per
layer by XLA), `tensor` (Megatron-style: heads, FFN hidden and vocabulary split). The batch
is split over data x fsdp. The mesh uses Auto axis types: shardings of parameters, optimizer
state and batch are fixed at the jit boundary and XLA's propagation places the rest, steered
by `nn.with_logical_constraint` on activations (names `activation_*` below).
"""

import contextlib
import functools
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')

# Logical axis -> mesh axis (or axes), for parameters (names given by stlm.models) and for
# activations (`activation_*`, used with nn.with_logical_constraint). Parameters shard their
# `embed` axis over fsdp, but activations keep embed whole: their batch is already split
# over fsdp, so splitting embed too would need an all-to-all per layer.
LOGICAL_RULES = (
    ('batch', BATCH_AXES),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('head_dim', None),
    ('norm', None),
    ('position', None),
    ('layers', None),
    ('activation_batch', BATCH_AXES),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv_heads', 'tensor'),
    ('activation_head_dim', None),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
)


def resolve_mesh_shape(shape, n_devices: int) -> tuple[int, ...]:
  """Fills a single -1 and checks the product equals the device count."""
  shape = tuple(int(s) for s in shape)
  if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise ValueError(f'config.mesh.shape={shape}: entries must be positive, with at most one -1')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % known:
      raise ValueError(f'config.mesh.shape={shape}: the fixed axes multiply to {known}, which '
                       f'does not divide the {n_devices} available devices')
    shape = tuple(n_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != n_devices:
    raise ValueError(f'config.mesh.shape={shape} needs {math.prod(shape)} devices but '
                     f'{n_devices} are available ({jax.process_count()} process(es) x '
                     f'{jax.local_device_count()} local device(s)); the axes must multiply to '
                     f'{n_devices}, or use -1 for one of them')
  return shape


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh over all devices (of every process) or `devices`."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_cfg.shape, len(devices))
  axes = tuple(mesh_cfg.axes)
  # jax.make_mesh defaults to Explicit axes, which would make every flax op sharding-typed;
  # Auto keeps GSPMD propagation (jit in/out shardings + logical constraints).
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


@contextlib.contextmanager
def mesh_context(mesh, rules=LOGICAL_RULES):
  """Makes `mesh` current and activates the logical rules, so model constraints apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh


def _fit_spec(spec: P, shape, mesh) -> P:
  """Drops mesh axes that do not divide their dimension (e.g. vocab 50257 over 2)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def logical_to_sharding(logical_axes, shape, mesh, rules=LOGICAL_RULES) -> NamedSharding:
  """NamedSharding of one array with logical axis names, e.g. ('activation_batch', None)."""
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  return NamedSharding(mesh, _fit_spec(spec, shape, mesh))


def param_shardings(boxed_abstract_params, mesh, rules=LOGICAL_RULES):
  """NamedShardings for params (or any tree of the same structure, e.g. optimizer moments)."""
  logical_specs = nn.get_partition_spec(boxed_abstract_params)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  abstract = nn.meta.unbox(boxed_abstract_params)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
                      mesh_specs, abstract, is_leaf=lambda s: isinstance(s, P))


def opt_state_shardings(abstract_opt_state, abstract_params, param_sh, mesh):
  """Optimizer moments sharded like their params; counters and scalars replicated.

  optax keeps per-param state (Adam's moments, Muon's momentum) as copies of the params
  tree, so a state leaf whose key path ends in a param's path, with that param's shape, is
  that param's. Read from the key paths rather than optax.tree_map_params, which
  re-initialises the optimizer on a placeholder that optax.contrib.muon's partition of the
  params cannot take.
  """
  replicated = NamedSharding(mesh, P())
  params = {tuple(getattr(k, 'key', k) for k in p): (x.shape, sh) for (p, x), sh in zip(
      jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(param_sh))}

  def sharding_of(path, leaf):
    keys = []  # the trailing dict keys: where a copy of the params tree puts a param's path
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, k.key)
    for start in range(len(keys)):
      shape, sh = params.get(tuple(keys[start:]), (None, None))
      if shape == leaf.shape:
        return sh
    return replicated
  return jax.tree_util.tree_map_with_path(sharding_of, abstract_opt_state)


def batch_axis_size(mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, mesh, *, what: str = 'config.train.batch_size') -> None:
  """Stops unless the global batch splits evenly over data x fsdp and over the processes."""
  axis, procs = batch_axis_size(mesh), jax.process_count()
  if batch_size % axis or batch_size % procs:
    shape, step = dict(mesh.shape), math.lcm(axis, procs)
    lower = batch_size // step * step
    nearest = ' or '.join(str(b) for b in (lower, lower + step) if b > 0)
    raise ValueError(f'{what}={batch_size} must be divisible by the data x fsdp mesh axes '
                     f'({shape["data"]} x {shape["fsdp"]} = {axis} devices) and by the '
                     f'{procs} process(es); the nearest valid sizes are {nearest}')


def process_batch_rows(mesh, batch_size: int) -> dict[int, tuple[int, int]]:
  """{process index: (first row, end row)} of the global batch held by each process.

  Each process feeds only its own rows, so every process must own one contiguous block of
  batch_size / process_count rows; a mesh whose tensor axis spans processes would make two
  processes share rows, which the per-process data shards cannot express.
  """
  sharding = NamedSharding(mesh, P(BATCH_AXES))
  rows: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map((batch_size,)).items():
    start, stop, _ = index[0].indices(batch_size)
    rows.setdefault(device.process_index, set()).update(range(start, stop))
  procs = len(rows)
  blocks = {}
  for proc, owned in sorted(rows.items()):
    lo, hi = min(owned), max(owned) + 1
    if hi - lo != len(owned) or len(owned) != batch_size // procs:
      raise ValueError(f'mesh {dict(mesh.shape)}: process {proc} holds batch rows '
                       f'{sorted(owned)[:8]}..., not one block of {batch_size // procs}; keep '
                       'the tensor axis within one host (at most its local device count)')
    blocks[proc] = (lo, hi)
  return blocks


@functools.lru_cache(maxsize=16)
def _check_process_rows(mesh, batch_size: int) -> None:
  process_batch_rows(mesh, batch_size)


def batch_sharding(mesh, leading_microbatch_axis: bool, batch_axes=BATCH_AXES) -> NamedSharding:
  spec = P(None, batch_axes) if leading_microbatch_axis else P(batch_axes)
  return NamedSharding(mesh, spec)


def without_axis(rules, axis):
  """`rules` with the mesh axis `axis` dropped from every mapping (an outer, vmapped axis
  such as a population's members takes it)."""
  def drop(target):
    if target == axis:
      return None
    if isinstance(target, tuple):
      kept = tuple(a for a in target if a != axis)
      return kept or None
    return target
  return tuple((name, drop(target)) for name, target in rules)


def global_batch(local_batch: dict, mesh, leading_microbatch_axis: bool) -> dict:
  """Assembles each process's numpy rows into one global jax.Array per key.

  Every process passes its own per-process batch (its data shard); its rows land on its own
  devices' slots of the data x fsdp split (see process_batch_rows).
  """
  sharding = batch_sharding(mesh, leading_microbatch_axis)
  batch_dim = 1 if leading_microbatch_axis else 0

  def put(x):
    x = np.asarray(x)
    global_shape = list(x.shape)
    global_shape[batch_dim] *= jax.process_count()
    if jax.process_count() > 1:
      _check_process_rows(mesh, global_shape[batch_dim])
    return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

  return {k: put(v) for k, v in local_batch.items()}


def shard_shapes(tree) -> dict:
  """{path: (global shape, shape of each addressable shard)}: what a sharded tree really holds."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): (tuple(x.shape),
                                       sorted({tuple(s.data.shape) for s in x.addressable_shards}))
          for path, x in flat}
