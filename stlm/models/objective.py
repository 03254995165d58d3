"""The summed loss statistics every model kind shares (training, validation, evaluation).

Here, below the trainer, so that evaluation scores held-out targets with the trainer's own
formula (stlm/eval/instruct.py) without importing the training code.
"""

import flax.linen as nn
import jax.numpy as jnp


HIDDEN = 'final_hidden'   # what a model sows into 'intermediates' for `hidden_sum`


def loss_sums(model: nn.Module, params, batch, *, rng=None, train: bool = False,
              hidden_sum=None):
  """Summed statistics of one micro-batch: the same formula for every model and tokenizer.

  nll: nats over all real targets; units: predictions (tokens, or bytes + end-of-chunk);
  bytes: UTF-8 text bytes of the targets, so nll / ln2 / bytes is bits per byte.
  Optional model outputs (docs/architecture.md): `extra_nll` (summed nats added to the
  training objective only, e.g. early-exit losses) is returned as 'extra_nll'; `stats`
  (name -> summed scalar) as 'stats', each later divided by the number of targets.
  hidden_sum: fn(params, final hidden states B x T x D, batch) -> a summed scalar, returned
  as 'hidden_sum' (distillation's KL to a teacher); it needs a model that sows HIDDEN.
  """
  rngs = {'dropout': rng} if train else None
  if hidden_sum is None:
    out = model.apply({'params': params}, batch, deterministic=not train, rngs=rngs)
  else:
    out, kept = model.apply({'params': params}, batch, deterministic=not train, rngs=rngs,
                            mutable=['intermediates'])
  mask = batch['loss_mask'].astype(jnp.float32)
  sums = {
      'nll': -jnp.sum(out['logprobs'] * mask),
      'units': jnp.sum(out['units'] * mask),
      'bytes': jnp.sum(batch['target_bytes'].astype(jnp.float32) * mask),
      'targets': jnp.sum(mask),
  }
  if 'extra_nll' in out:
    sums['extra_nll'] = jnp.asarray(out['extra_nll'], jnp.float32)
  if out.get('stats'):
    sums['stats'] = {k: jnp.asarray(v, jnp.float32) for k, v in out['stats'].items()}
  if hidden_sum is not None:
    sums['hidden_sum'] = hidden_sum(params, kept['intermediates'][HIDDEN][0], batch)
  return sums
