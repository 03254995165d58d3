"""Builds a model and its featurizer from a config, initializes it, counts its parameters."""

from typing import Any

import flax.linen as nn
import jax

from stlm.data import pauses
from stlm.models import kinds


def build_model(model_cfg) -> nn.Module:
  """The LM of model_cfg.kind (see stlm/models/kinds.py)."""
  return kinds.get_kind(model_cfg.kind).build(model_cfg)


def make_featurizer(config, tokenizer):
  """Text -> examples for `config.model.kind` (its registered `featurizer`), with the pause
  tokens of `config.model` inserted when it asks for them."""
  return pauses.maybe_wrap(config, kinds.get_kind(config.model.kind).featurizer(config,
                                                                               tokenizer))


def dummy_batch(model_cfg, batch_size: int = 1, seq_len: int | None = None):
  """A batch of the layout model_cfg.kind consumes (see docs/architecture.md).

  numpy arrays: building it costs no device work or compilation.
  """
  return kinds.get_kind(model_cfg.kind).dummy_batch(model_cfg, batch_size, seq_len)


def _init_fn(model, model_cfg, batch_size):
  batch = dummy_batch(model_cfg, batch_size)

  def init(rng):
    rngs = {'params': rng, 'dropout': jax.random.fold_in(rng, 1)}
    return model.init(rngs, batch, deterministic=True)['params']
  return init


def init_boxed_params(model, model_cfg, rng, batch_size: int = 1):
  """Params still wrapped in LogicallyPartitioned boxes (for sharding-aware init)."""
  return jax.jit(_init_fn(model, model_cfg, batch_size))(rng)


def init_params(model, model_cfg, rng, batch_size: int = 1):
  """Unboxed params (in model.param_dtype, float32 by default)."""
  return nn.unbox(init_boxed_params(model, model_cfg, rng, batch_size))


def abstract_params(model, model_cfg, batch_size: int = 1):
  """Boxed ShapeDtypeStructs of the params, without allocating or computing anything."""
  return jax.eval_shape(_init_fn(model, model_cfg, batch_size), jax.random.PRNGKey(0))


def logical_partition_specs(model, model_cfg):
  """PartitionSpecs of logical axis names ('embed', 'heads', ...), one per param."""
  return nn.get_partition_spec(abstract_params(model, model_cfg))


count_params = kinds.count_params


def param_breakdown(params, model_cfg) -> dict[str, Any]:
  """Parameters by role: embedding, head, core, total, tied (the kind defines the roles)."""
  return kinds.get_kind(model_cfg.kind).param_breakdown(params, model_cfg)
