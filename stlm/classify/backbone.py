"""A pretrained (or freshly initialised) model as a text encoder for classification.

`load_backbone('<export dir>')` or `scratch_backbone(config)` give the model, its params and
tokenizer; `tokenize` makes padded id arrays ([eot] + text tokens, truncated); `pooled_fn`
returns a jit-able function of (params, arrays) -> pooled vectors B x D. Pooling comes from the
kind's registry entry: causal kinds summarise a sequence at its last real position (the only
one that has seen all of it); bidirectional kinds use the first position or the mean.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stlm import cli_errors
from stlm import export as export_lib
from stlm import tokenizers
from stlm.config import errors as config_errors
from stlm.models import factory
from stlm.models import kinds

POOLINGS = ('first', 'mean', 'last')


@dataclasses.dataclass
class Backbone:
  model: Any
  params: Any
  config: Any
  tokenizer: Any
  source: str           # export path, or 'scratch'

  @property
  def kind(self) -> kinds.ModelKind:
    return kinds.get_kind(self.config.model.kind)

  @property
  def hidden_dim(self) -> int:
    return int(self.config.model.hidden_dim)

  @property
  def max_len(self) -> int:
    return int(self.config.model.max_len)

  def pooling(self, requested: str) -> str:
    if requested not in POOLINGS:
      raise cli_errors.FlagError(f'--pool={requested!r}; choose one of {", ".join(POOLINGS)}')
    return 'last' if self.kind.causal else requested


def _has_features(model) -> bool:
  return hasattr(model, 'features')   # B x T x D hidden states, what a head is trained on


def _check_features(model, kind_name):
  if not _has_features(model):
    config_errors.fail('model.kind', kind_name, 'has no features() method (B x T x D hidden '
                       'states), so it cannot be used as a classification backbone')


def check_backbone_export(export_dir: str, flag: str = '--checkpoint'):
  """The export's config, after checking (without reading params) that it is a whole export
  of a kind with hidden states to classify from; BadExportError otherwise."""
  config = export_lib.check_export(export_dir, flag)
  if not _has_features(factory.build_model(config.model)):
    raise export_lib.BadExportError(
        f'{flag}={export_dir} holds a model.kind={config.model.kind!r} model, which has no '
        'features() (B x T x D hidden states), so it cannot be a classification backbone')
  return config


def load_backbone(export_dir: str, flag: str = '--checkpoint') -> Backbone:
  check_backbone_export(export_dir, flag)
  ex = export_lib.load_export(export_dir, flag)
  return Backbone(ex.model, ex.params, ex.config, ex.tokenizer, export_dir)


def scratch_like(export_dir: str, seed: int | None = None) -> Backbone:
  """The export's own model (shape, tokenizer, init seed), untrained: the scratch arm that
  differs from the pretrained one only in its weights."""
  bb = scratch_backbone(export_lib.check_export(export_dir, '--checkpoint=scratch:'), seed)
  return dataclasses.replace(bb, source=f'scratch:{export_dir}')


def scratch_backbone(config, seed: int | None = None) -> Backbone:
  """The config's model, untrained (same init as training step 0 with `seed`)."""
  tok_cfg = config.tokenizer
  if tok_cfg.kind == 'sentencepiece' and not tok_cfg.get('sp_model_path'):
    raise config_errors.ConfigError(
        'a scratch model with tokenizer.kind=sentencepiece needs '
        '--config.tokenizer.sp_model_path (use the pretrained export\'s tokenizer.model so '
        'both models see the same tokens)')
  tokenizer = tokenizers.build_tokenizer(tok_cfg)
  config = ml_collections.ConfigDict(config.to_dict())   # unlocked private copy
  config.model.vocab_size = tokenizer.vocab_size
  kind = kinds.get_kind(config.model.kind)
  kind.validate(config.model)
  model = kind.build(config.model)
  _check_features(model, config.model.kind)
  seed = int(config.seed if seed is None else seed)
  init_rng = jax.random.split(jax.random.key(seed))[0]   # as stlm.train.loop initialises
  batch = kind.dummy_batch(config.model, 1, None)
  params = jax.jit(lambda r: model.init({'params': r, 'dropout': r}, batch,
                                        deterministic=True)['params'])(init_rng)
  return Backbone(model, nn.unbox(params), config, tokenizer, 'scratch')


def tokenize(tokenizer, texts, max_len: int) -> dict[str, np.ndarray]:
  """inputs/segment_ids/positions N x T (T = longest, <= max_len): [eot] + tokens, 0-padded."""
  rows = [[tokenizer.eot_id] + tokenizer.encode(t)[:max_len - 1] for t in texts]
  T = max(len(r) for r in rows)
  inputs = np.zeros((len(rows), T), np.int32)
  seg = np.zeros((len(rows), T), np.int32)
  for i, r in enumerate(rows):
    inputs[i, :len(r)] = r
    seg[i, :len(r)] = 1
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), inputs.shape).copy()
  return {'inputs': inputs, 'segment_ids': seg, 'positions': pos}


def pool(h_BxTxD, segment_ids_BxT, how: str):
  real_BxT = (segment_ids_BxT > 0).astype(h_BxTxD.dtype)
  if how == 'first':
    return h_BxTxD[:, 0]
  if how == 'mean':
    return (h_BxTxD * real_BxT[..., None]).sum(1) / jnp.maximum(real_BxT.sum(1, keepdims=True), 1)
  if how == 'last':
    last_B = jnp.maximum(real_BxT.sum(1).astype(jnp.int32) - 1, 0)
    return jnp.take_along_axis(h_BxTxD, last_B[:, None, None], axis=1)[:, 0]
  raise ValueError(f'pooling {how!r}; choose one of {", ".join(POOLINGS)}')


def hidden_fn(backbone: Backbone):
  """(params, arrays, *, rng=None) -> hidden states B x T x D (dropout when rng is given)."""
  model = backbone.model

  def f(params, arrays, rng=None):
    rngs = {'dropout': rng} if rng is not None else None
    h = model.apply({'params': params}, arrays['inputs'], arrays['segment_ids'],
                    arrays['positions'], deterministic=rng is None, rngs=rngs,
                    method='features')
    return h.astype(jnp.float32)
  return f


def pooled_fn(backbone: Backbone, how: str):
  """(params, arrays, rng=None) -> pooled B x D float32."""
  how = backbone.pooling(how)
  hidden = hidden_fn(backbone)

  def f(params, arrays, rng=None):
    return pool(hidden(params, arrays, rng), arrays['segment_ids'], how)
  return f
