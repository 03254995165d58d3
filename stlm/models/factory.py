"""Builds a model from `config.model`, initializes it, and counts its parameters."""

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np

MODEL_KINDS = ('baseline', 'byte_pool')


def build_model(model_cfg) -> nn.Module:
  """The LM named by model_cfg.kind."""
  kind = model_cfg.kind
  from stlm.models import kinds  # pylint: disable=g-import-not-at-top
  if kind in kinds.kind_names() and kind not in MODEL_KINDS:
    return kinds.get_kind(kind).build(model_cfg)
  if kind == 'baseline':
    from stlm.models import baseline  # pylint: disable=g-import-not-at-top
    return baseline.BaselineLM(model_cfg)
  if kind == 'byte_pool':
    try:
      from stlm.models import byte_pool  # pylint: disable=g-import-not-at-top
    except ModuleNotFoundError as e:
      if e.name != 'stlm.models.byte_pool':
        raise
      raise ImportError('model.kind = "byte_pool" needs stlm/models/byte_pool.py '
                        '(BytePoolLM), which is not present in this checkout') from e
    return byte_pool.BytePoolLM(model_cfg)
  raise ValueError(f'model.kind {kind!r} unknown; choose one of {MODEL_KINDS}')


def dummy_batch(model_cfg, batch_size: int = 1, seq_len: int | None = None):
  """A batch of the layout model_cfg.kind consumes (see docs/architecture.md).

  numpy arrays: building it costs no device work or compilation.
  """
  T = seq_len or min(model_cfg.max_len, 16)
  shape = (batch_size, T)
  if model_cfg.kind == 'byte_pool':
    # One slot more than the longest chunk: room for its end-of-chunk symbol.
    tokens_shape = shape + (model_cfg.byte_pool.max_bytes_per_chunk + 1,)
  else:
    tokens_shape = shape
  return dict(
      inputs=np.zeros(tokens_shape, np.int32),
      targets=np.zeros(tokens_shape, np.int32),
      segment_ids=np.ones(shape, np.int32),
      positions=np.broadcast_to(np.arange(T, dtype=np.int32), shape).copy(),
      loss_mask=np.ones(shape, np.float32),
      target_bytes=np.ones(shape, np.int32),
  )


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


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays, ShapeDtypeStructs or boxed params."""
  leaves = jax.tree_util.tree_leaves(nn.unbox(tree))
  return int(sum(math.prod(np.shape(x)) for x in leaves))


def param_breakdown(params, model_cfg) -> dict[str, Any]:
  """Parameters by role: embedding, head, core (the shared transformer) and total.

  baseline: embedding = token table, head = untied LM head (0 when tied, tied=True),
  core = everything else. byte_pool: embedding = top-level submodules whose name has
  'encoder', head = those with 'decoder', core = the rest (the causal transformer).
  """
  from stlm.models import kinds  # pylint: disable=g-import-not-at-top
  if model_cfg.kind not in MODEL_KINDS:
    return kinds.get_kind(model_cfg.kind).param_breakdown(params, model_cfg)
  params = nn.unbox(params)
  total = count_params(params)
  if model_cfg.kind == 'byte_pool':
    embedding = sum(count_params(v) for k, v in params.items() if 'encoder' in k)
    head = sum(count_params(v) for k, v in params.items() if 'decoder' in k)
    tied = False
  else:
    embedding = count_params(params['embed'])
    head = count_params(params.get('lm_head', {}))
    tied = bool(model_cfg.tie_embeddings)
  return dict(embedding=embedding, head=head, core=total - embedding - head, total=total,
              tied=tied)
