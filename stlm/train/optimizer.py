"""Learning-rate schedules and the AdamW optimizer, all from optax."""

import flax.linen as nn
import jax
import optax


def make_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup, then cosine / linear decay to lr * min_lr_ratio, or constant."""
  peak, steps, warmup = train_cfg.lr, train_cfg.steps, train_cfg.warmup_steps
  end = peak * train_cfg.min_lr_ratio
  if train_cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), end)
  if train_cfg.schedule == 'linear':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup),
         optax.linear_schedule(peak, end, max(steps - warmup, 1))], [warmup])
  if train_cfg.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  raise ValueError(f'config.train.schedule={train_cfg.schedule!r} is not cosine|linear|constant')


# Logical axes (stlm/models/layers.py) whose params are never decayed by default: norm scales
# and biases, and lookup tables (a table's FIRST axis is its vocabulary or position index; an
# output head (embed, vocab) is a matrix and decays).
NO_DECAY_AXES = ('norm',)
TABLE_AXES = ('vocab', 'position')


def param_axes(boxed_params):
  """Logical axis names of every param: a tree of tuples (None where an axis is unnamed)."""
  specs = nn.get_partition_spec(boxed_params)
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def decays(axes: tuple) -> bool:
  """Whether a param with these logical axes gets weight decay (the default policy)."""
  return (len(axes) >= 2 and not any(a in NO_DECAY_AXES for a in axes)
          and axes[0] not in TABLE_AXES)


def decay_mask(axes_tree, decay_norms_biases_embeddings: bool = False):
  """True where weight decay applies, from each param's logical axis names (`param_axes`).

  Matrices decay; norms, biases (1-D) and embedding / position tables do not.
  """
  is_axes = lambda x: isinstance(x, tuple)
  if decay_norms_biases_embeddings:
    return jax.tree.map(lambda _: True, axes_tree, is_leaf=is_axes)
  return jax.tree.map(decays, axes_tree, is_leaf=is_axes)


def make_optimizer(train_cfg, axes=None) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the configured schedule and decay mask.

  axes: the params' logical axis names (`param_axes` of the boxed params); without them
  (params that carry no names) every param of two or more dimensions decays.
  """
  if axes is None:
    mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2 or train_cfg.decay_norms_biases_embeddings,
                                  p)
  else:
    mask = decay_mask(axes, train_cfg.decay_norms_biases_embeddings)
  adamw = optax.adamw(
      make_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
      weight_decay=train_cfg.weight_decay, mask=mask)
  if train_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), adamw)
  return adamw
