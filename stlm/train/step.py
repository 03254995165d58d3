"""The loss every model kind shares, and the jit-able train and eval steps."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from stlm.models import dropout as dropout_lib
from stlm.models.objective import loss_sums
from stlm.train import distill
from stlm.train.state import TrainState

LN2 = math.log(2.0)


def stats_metrics(sums) -> dict:
  """Per-target averages of a model's `stats` sums (empty when it reports none)."""
  targets = jnp.maximum(sums['targets'], 1.0)
  return {k: v / targets for k, v in sums.get('stats', {}).items()}


def member_updates(updates, params, member: dict, lr, decay_mask):
  """A population member's update from the shared optimizer's (stlm/train/population.py).

  member['lr_scale'] = its train.lr / the shared one: every schedule is proportional to its
  peak rate, so scaling the update is training at the member's rate. member['decay_delta'] =
  its train.weight_decay - the shared one: AdamW's decoupled decay adds -lr * wd * param on
  the decayed params (decay_mask), so the difference is added the same way.
  """
  scale = member['lr_scale']
  updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
  if 'decay_delta' not in member:
    return updates
  step_size = lr * scale * member['decay_delta']
  return jax.tree.map(lambda u, p, m: u - (step_size * p).astype(u.dtype) if m else u,
                      updates, params, decay_mask)


def train_step(state: TrainState, batches, teacher_params=None, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule=None, skip_nonfinite: bool = False,
               dropout_schedule=None, member: dict | None = None, decay_mask=None,
               teacher=None):
  """One optimizer update over grad_accum micro-batches (leading axis of every batch leaf).

  Gradients of the summed nll (+ the model's extra_nll) are accumulated and divided by the
  total number of predicted units, so accumulation gives exactly the gradient of one big batch.
  Reported loss and bits per byte count the nll only.
  metrics['nonfinite'] is 1 when the loss or the global gradient norm is not finite (checked
  here, on device, every step); with skip_nonfinite that update is dropped (params and
  optimizer state kept).
  dropout_schedule: fn(step) -> factor on the model's dropout rates (traced: one compilation
  for every step), or None.
  member: a population member's own hyper-parameters (`member_updates`; 'dropout_factor'
  multiplies the model's dropout rates), traced, so one compiled step serves every member.
  teacher: (teacher module, train.distill config, model config) with `teacher_params`: the
  objective becomes distill.objective's mix of the nll and the KL to the teacher.
  """
  distilling = teacher is not None and teacher_params is not None
  teacher_kl = None
  if distilling:
    teacher_model, distill_cfg, model_cfg = teacher
    teacher_kl = lambda params, hidden_BxTxD, batch: distill.kl_sum(
        model, params, hidden_BxTxD, batch, teacher_model, teacher_params, distill_cfg,
        model_cfg)
  step_rng = jax.random.fold_in(state.rng, state.step)
  factor = None if dropout_schedule is None else dropout_schedule(state.step)
  if member is not None and 'dropout_factor' in member:
    factor = member['dropout_factor'] * (1.0 if factor is None else factor)

  def micro(carry, xs):
    grads_acc, sums_acc = carry
    index, batch = xs
    rng = jax.random.fold_in(step_rng, index)

    def nll_fn(params):
      with dropout_lib.rate_factor(factor):
        sums = loss_sums(model, params, batch, rng=rng, train=True, hidden_sum=teacher_kl)
      nll = sums['nll']
      if distilling and float(distill_cfg.alpha) > 0:   # alpha 0: the KL is only logged
        nll = distill.objective(nll, sums['hidden_sum'], distill_cfg)
      return nll + sums.get('extra_nll', 0.0), sums

    grads, sums = jax.grad(nll_fn, has_aux=True)(state.params)
    return (jax.tree.map(jnp.add, grads_acc, grads),
            jax.tree.map(jnp.add, sums_acc, sums)), None

  n_micro = jax.tree.leaves(batches)[0].shape[0]
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  # The sums' structure (optional extra_nll / stats) is the model's: read it off a trace.
  first = jax.tree.map(lambda x: x[0], batches)
  zero_sums = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype),
      jax.eval_shape(lambda p, b: loss_sums(model, p, b, rng=step_rng, train=True,
                                            hidden_sum=teacher_kl),
                     state.params, first))
  (grads, sums), _ = jax.lax.scan(micro, (zeros, zero_sums), (jnp.arange(n_micro), batches))
  denom = jnp.maximum(sums['units'], 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if member is not None:
    updates = member_updates(updates, state.params, member, schedule(state.step), decay_mask)
  params = optax.apply_updates(state.params, updates)
  loss, grad_norm = sums['nll'] / denom, optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  metrics = {
      'loss': loss,
      'bits_per_byte': sums['nll'] / LN2 / jnp.maximum(sums['bytes'], 1.0),
      'grad_norm': grad_norm,
      'nonfinite': 1.0 - finite.astype(jnp.float32),
      'units': sums['units'],
      'targets': sums['targets'],
      **stats_metrics(sums),
  }
  if distilling:
    metrics['distill_kl'] = sums['hidden_sum'] / denom
  if 'extra_nll' in sums:  # the training objective's extra terms, per unit
    metrics['extra_loss'] = sums['extra_nll'] / denom
  if schedule is not None:
    metrics['lr'] = schedule(state.step) * (1.0 if member is None else member['lr_scale'])
  if factor is not None:
    metrics['dropout_factor'] = factor
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params, batch, *, model: nn.Module):
  """Summed validation statistics of one batch (combine across batches, then divide)."""
  return loss_sums(model, params, batch, train=False)
