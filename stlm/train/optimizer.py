"""Learning-rate schedules and the optimizers (AdamW, Muon), all from optax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


SCHEDULES = ('cosine', 'linear', 'constant', 'wsd', 'inverse_sqrt')
WSD_DECAY_SHAPES = ('linear', 'cosine', '1-sqrt')
DROPOUT_SCHEDULES = ('constant', 'early', 'late', 'linear')
DECAY_PARAMS = ('matrices', 'ndim2', 'all')


def _warmup(peak, warmup):
  return optax.linear_schedule(0.0, peak, warmup)


def _wsd(peak, end, steps, warmup, fraction, shape) -> optax.Schedule:
  """Warmup-stable-decay (Hu et al. 2024, MiniCPM): peak until the last `fraction` of the
  steps, then down to `end` along `shape` (linear, cosine, or 1-sqrt of Haegele et al. 2024)."""
  n_decay = max(int(round(fraction * steps)), 1)
  decay_start = max(steps - n_decay, warmup)
  n_decay = max(steps - decay_start, 1)
  if shape == 'linear':
    decay = optax.linear_schedule(peak, end, n_decay)
  elif shape == 'cosine':
    decay = optax.cosine_decay_schedule(peak, n_decay, alpha=end / peak if peak else 0.0)
  elif shape == '1-sqrt':
    decay = lambda t: end + (peak - end) * (1.0 - jnp.sqrt(jnp.clip(t / n_decay, 0.0, 1.0)))
  else:
    raise ValueError(f'config.train.wsd_decay_shape={shape!r} is not one of '
                     f'{", ".join(WSD_DECAY_SHAPES)}')
  return optax.join_schedules(
      [_warmup(peak, warmup), optax.constant_schedule(peak), decay], [warmup, decay_start])


def make_schedule(train_cfg, peak: float | None = None) -> optax.Schedule:
  """Linear warmup, then cosine / linear decay to peak * min_lr_ratio, constant, WSD
  (warmup-stable-decay) or inverse square root (peak * sqrt(warmup / step)).

  peak: the peak rate, train.lr unless given (Muon's params follow the same shape from
  train.muon_lr).
  """
  peak = train_cfg.lr if peak is None else peak
  steps, warmup = train_cfg.steps, train_cfg.warmup_steps
  end = peak * train_cfg.min_lr_ratio
  if train_cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), end)
  if train_cfg.schedule == 'linear':
    return optax.join_schedules(
        [_warmup(peak, warmup), optax.linear_schedule(peak, end, max(steps - warmup, 1))],
        [warmup])
  if train_cfg.schedule == 'constant':
    return optax.join_schedules([_warmup(peak, warmup), optax.constant_schedule(peak)],
                                [warmup])
  if train_cfg.schedule == 'wsd':
    return _wsd(peak, end, steps, warmup, train_cfg.wsd_decay_fraction,
                train_cfg.wsd_decay_shape)
  if train_cfg.schedule == 'inverse_sqrt':
    # After warmup W: peak * sqrt(W / step), continuous at W (W = 0 decays from step 1).
    w = max(warmup, 1)
    return optax.join_schedules(
        [_warmup(peak, warmup), lambda t: peak * jnp.sqrt(w / (jnp.maximum(t, 0) + w))],
        [warmup])
  raise ValueError(f'config.train.schedule={train_cfg.schedule!r} is not one of '
                   f'{", ".join(SCHEDULES)}')


def make_dropout_schedule(train_cfg):
  """fn(step) -> factor on model.dropout (Liu et al. 2023), or None for 'constant'.

  early: 1 for the first s steps, then 0; late: 0, then 1 from step s; linear: 1 down to 0
  at step s (s = train.dropout_schedule_steps, 0 = train.steps). Traced inside the jitted
  step, so changing rates never recompiles.
  """
  kind = train_cfg.dropout_schedule
  s = train_cfg.dropout_schedule_steps or train_cfg.steps
  if kind == 'constant':
    return None
  if kind == 'early':
    return lambda step: jnp.where(step < s, 1.0, 0.0)
  if kind == 'late':
    return lambda step: jnp.where(step < s, 0.0, 1.0)
  if kind == 'linear':
    return lambda step: jnp.clip(1.0 - step / s, 0.0, 1.0)
  raise ValueError(f'config.train.dropout_schedule={kind!r} is not one of '
                   f'{", ".join(DROPOUT_SCHEDULES)}')


# Logical axes (stlm/models/layers.py) whose params are never decayed by default: norm scales
# and biases, and lookup tables (a table's FIRST axis is its vocabulary or position index; an
# output head (embed, vocab) is a matrix and decays).
NO_DECAY_AXES = ('norm',)
TABLE_AXES = ('vocab', 'position')


def param_axes(boxed_params):
  """Logical axis names of every param: a tree of tuples (None where an axis is unnamed)."""
  specs = nn.get_partition_spec(boxed_params)
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def _is_axes(x) -> bool:
  # optax's MaskedNode (a param another transform owns) is a NamedTuple too: keep it a node.
  return isinstance(x, tuple) and not isinstance(x, optax.MaskedNode)


def _unnamed_axes(params):
  """(None,) * ndim for every param: the policy for params that carry no logical names."""
  return jax.tree.map(lambda x: (None,) * x.ndim, params)


def decays(axes: tuple) -> bool:
  """Whether a param with these logical axes gets weight decay (the default policy)."""
  return (len(axes) >= 2 and not any(a in NO_DECAY_AXES for a in axes)
          and axes[0] not in TABLE_AXES)


def decay_mask(axes_tree, which: str = 'matrices'):
  """True where weight decay applies, from each param's logical axis names (`param_axes`).

  which = train.weight_decay_params: 'matrices' (matrices decay; norms, biases and embedding
  / position tables do not), 'ndim2' (every param of two or more dimensions, tables and the
  tied embedding included: nanoGPT's configure_optimizers, the original repository's set-up),
  'all'.
  """
  rule = {'matrices': decays, 'ndim2': lambda axes: len(axes) >= 2,
          'all': lambda axes: True}
  if which not in rule:
    raise ValueError(f'config.train.weight_decay_params={which!r} is not one of '
                     f'{", ".join(DECAY_PARAMS)}')
  return jax.tree.map(rule[which], axes_tree, is_leaf=_is_axes)


# Muon's matrices. An attention kernel keeps its heads as two axes: q/k/v write
# (heads, head_dim), o reads them; nn.scan stacks the layers of a scanned model on 'layers',
# one matrix per layer (Muon's batch axes).
HEAD_AXES = (('heads', 'head_dim'), ('kv_heads', 'head_dim'))
STACKED_AXES = ('layers',)


def muon_dimension_numbers(axes: tuple) -> optax.contrib.MuonDimensionNumbers | None:
  """How Muon reads a param with these logical axes as a matrix (reduction = input axes,
  output = output axes; the rest are batch axes), or None where AdamW trains it instead.

  Muon is for the hidden weight matrices (Jordan et al. 2024): embedding, n-gram and output
  head tables (any 'vocab' axis), position tables (first axis 'position'), norms, and params
  of one dimension or only a head group (per-head biases, learned query vectors) stay on
  AdamW. Kernels are laid out inputs first, outputs last (x @ W): a head group at the end is
  the output, at the start the input; otherwise 'embed' first reads the residual stream (the
  rest is the output), and any other layout writes its last axis.
  """
  own = [i for i, a in enumerate(axes) if a not in STACKED_AXES]
  names = tuple(axes[i] for i in own)
  if (len(names) < 2 or any(a in NO_DECAY_AXES or a == 'vocab' for a in names)
      or names[0] in TABLE_AXES):
    return None
  if names[-2:] in HEAD_AXES:
    split = len(names) - 2
  elif names[:2] in HEAD_AXES:
    split = 2
  elif names[0] == 'embed':
    split = 1
  else:
    split = len(names) - 1
  if split in (0, len(names)):
    return None
  return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(own[:split]),
                                            output_axis=tuple(own[split:]))


def _adamw(train_cfg, axes_of) -> optax.GradientTransformation:
  """AdamW at train.lr's schedule, decaying the params train.weight_decay_params chooses."""
  return optax.adamw(
      make_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
      weight_decay=train_cfg.weight_decay,
      mask=lambda p: decay_mask(axes_of(p), train_cfg.weight_decay_params))


def _muon(train_cfg, axes_of) -> optax.GradientTransformation:
  """optax's Muon (Nesterov momentum, 5 quintic Newton-Schulz steps, update scaled by
  sqrt(max(1, fan_out / fan_in))) at train.muon_lr's schedule for the hidden matrices
  (`muon_dimension_numbers`), the same AdamW as 'adamw' for every other param.

  The other params go to `_adamw`, not optax.contrib.muon's own Adam branch: that one is
  Nesterov whenever Muon is and decays every param it trains, so it would not be the
  configured AdamW.
  """
  is_dims = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
  dims_of = lambda p: jax.tree.map(muon_dimension_numbers, axes_of(p), is_leaf=_is_axes)
  labels_of = lambda p: jax.tree.map(lambda d: 'adamw' if d is None else 'muon', dims_of(p),
                                     is_leaf=is_dims)
  muon = optax.contrib.muon(
      make_schedule(train_cfg, peak=train_cfg.muon_lr), beta=train_cfg.muon_momentum,
      weight_decay=train_cfg.muon_weight_decay,
      weight_decay_mask=lambda p: decay_mask(axes_of(p), train_cfg.weight_decay_params),
      muon_weight_dimension_numbers=dims_of)
  return optax.partition({'muon': muon, 'adamw': _adamw(train_cfg, axes_of)}, labels_of)


# train.optimizer -> fn(train config, params -> their logical axes) -> the transform that
# follows gradient clipping.
OPTIMIZERS = {'adamw': _adamw, 'muon': _muon}


def make_optimizer(train_cfg, axes=None) -> optax.GradientTransformation:
  """Global-norm clipping, then train.optimizer (`OPTIMIZERS`) with the configured schedule
  and decay mask.

  axes: the params' logical axis names (`param_axes` of the boxed params); without them
  (params that carry no names) they are read as unnamed axes, one per dimension, so the
  default policy decays every param of two or more dimensions, and Muon trains them too.
  """
  kind = train_cfg.optimizer
  if kind not in OPTIMIZERS:
    raise ValueError(f'config.train.optimizer={kind!r} is not one of {", ".join(OPTIMIZERS)}')
  axes_of = _unnamed_axes if axes is None else (lambda _: axes)
  tx = OPTIMIZERS[kind](train_cfg, axes_of)
  if train_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), tx)
  return tx
