"""Pause tokens (Goyal et al. 2023) on the model side: one learned input vector.

The featurizer (stlm/data/pauses.py) inserts pause positions into the data with input id
`stlm.ids.PAUSE_ID`; the model swaps their input vector for `pause_embedding` (a D
vector) before the core. Whether a pause's position predicts anything is the data's
business (loss_mask / target_bytes), so the loss accounting is unchanged. With pauses off
(the default) no parameter exists and inputs pass through untouched.
"""

import jax.numpy as jnp

from stlm import ids as pause_ids
from stlm.models import layers


def enabled(cfg) -> bool:
  return int(cfg.pause_every) > 0 or int(cfg.pause_before_continuation) > 0


def make_param(module, cfg):
  """The pause vector (call from the LM's setup), or None when pauses are off."""
  if not enabled(cfg):
    return None
  return layers.make_param(module, 'pause_embedding', layers.EMBED_INIT, (cfg.hidden_dim,),
                           ('embed',), cfg)


def is_pause(inputs):
  """bool B x T: positions whose input is a pause (token ids B x T, or chunk rows B x T x C)."""
  first = inputs if inputs.ndim == 2 else inputs[..., 0]
  return first == pause_ids.PAUSE_ID


def strip(inputs):
  """Inputs with pause ids replaced by 0 (a valid id / PAD), ready for the embedding."""
  return jnp.where(inputs == pause_ids.PAUSE_ID, 0, inputs)


def substitute(x_BxTxD, pause_BxT, pause_vec):
  """x with the pause vector at pause positions (x unchanged when pause_vec is None)."""
  if pause_vec is None:
    return x_BxTxD
  return jnp.where(pause_BxT[..., None], pause_vec.astype(x_BxTxD.dtype), x_BxTxD)
