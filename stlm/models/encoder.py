"""The encoder LM: token embedding (+1 [MASK] row) -> bidirectional Transformer -> tied head.

Masked-language modelling (BERT): the featurizer (stlm/data/mlm.py) replaces some input
tokens, `targets` hold the original tokens, and `loss_mask` is 1 only on the chosen
positions, so the shared loss (stlm.train.step.loss_sums) counts only those.

The [MASK] id is `vocab_size` (one past the tokenizer's last id; stlm.data.mlm.mask_id): the
embedding table has one extra row for it, so any tokenizer of the codebase (GPT-2,
sentencepiece, bytes) works unchanged. The head scores only the tokenizer's `vocab_size` ids:
[MASK] is never a target. Registered as model kind 'encoder' (bidirectional; no bits per
byte: see kinds.ModelKind.reports_bits_per_byte).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

import numpy as np

from stlm.config import errors as config_errors
from stlm.data import mlm as mlm_data
from stlm.models import baseline
from stlm.models import kinds
from stlm.models import layers
from stlm.models import transformer


class EncoderLM(nn.Module):
  """Bidirectional encoder over BPE tokens; `cfg` is the model ConfigDict section."""
  cfg: Any

  def setup(self):
    cfg = self.cfg
    self.embedding = layers.make_param(self, 'embedding', layers.EMBED_INIT,
                                       (cfg.vocab_size + 1, cfg.hidden_dim), ('vocab', 'embed'),
                                       cfg)
    self.transformer = transformer.Transformer(cfg, causal=False)

  def features(self, inputs_BxT, segment_ids_BxT, positions_BxT, *, deterministic=True):
    """Final-norm hidden states B x T x D (what classification pools)."""
    dtype = layers.dtype_of(self.cfg.dtype)
    x_BxTxD = jnp.take(self.embedding, inputs_BxT, axis=0).astype(dtype)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, layers.ACT_BxTxD)
    return self.transformer(x_BxTxD, segment_ids_BxT, positions_BxT,
                            deterministic=deterministic)

  def logits(self, inputs_BxT, segment_ids_BxT, positions_BxT, *, deterministic=True):
    """Float32 logits B x T x vocab_size of the token at each position."""
    y_BxTxD = self.features(inputs_BxT, segment_ids_BxT, positions_BxT,
                            deterministic=deterministic)
    dtype = layers.dtype_of(self.cfg.dtype)
    table_VxD = self.embedding[:self.cfg.vocab_size]
    logits_BxTxV = jnp.einsum('btd,vd->btv', y_BxTxD.astype(dtype), table_VxD.astype(dtype),
                              preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits_BxTxV, layers.ACT_BxTxV)

  def __call__(self, batch, *, deterministic=True):
    logits_BxTxV = self.logits(batch['inputs'], batch['segment_ids'], batch['positions'],
                               deterministic=deterministic)
    targets_BxT = batch['targets']
    logprobs_BxT, greedy_BxT = baseline.target_scores(logits_BxTxV, targets_BxT)
    return dict(logprobs=logprobs_BxT,
                units=jnp.ones(targets_BxT.shape, jnp.float32),
                greedy=greedy_BxT,
                # Summed over chosen positions only; the step divides by their number.
                stats={'accuracy': jnp.sum(greedy_BxT * batch['loss_mask'])})


def param_breakdown(params, model_cfg) -> dict[str, Any]:
  """embedding = token table incl. the [MASK] row; head = 0 (tied to it); core = the rest."""
  params = nn.unbox(params)
  total = kinds.count_params(params)
  embedding = kinds.count_params(params['embedding'])
  return dict(embedding=embedding, head=0, core=total - embedding, total=total, tied=True)


def flops_per_target(model_cfg, breakdown) -> float:
  """Training FLOPs per masked target: per position cost / mask_rate.

  Every position runs the core and the head (logits are dense; loss is read at the chosen
  ones): 6 x (core + tied head matmul) + full (not causal, so twice the causal) attention,
  and only a fraction mask_rate of positions are targets.
  """
  m = model_cfg
  per_position = 6 * (breakdown['core'] + m.vocab_size * m.hidden_dim) \
      + 2 * kinds.attention_flops_per_target(m)
  return per_position / m.mlm.mask_rate


def _synthetic_batch(model_cfg, rng: np.random.Generator, leading_shape) -> kinds.Batch:
  """Random ids, ~15% of positions chosen and replaced by [MASK] (benchmarks)."""
  batch = kinds.random_batch(model_cfg, (), rng, leading_shape, 0, model_cfg.vocab_size)
  chosen = rng.random(batch['inputs'].shape) < 0.15
  batch['targets'] = batch['inputs'].copy()
  batch['inputs'] = np.where(chosen, model_cfg.vocab_size, batch['inputs']).astype(np.int32)
  batch['loss_mask'] = chosen.astype(np.float32)
  return batch


def validate(model_cfg) -> None:
  mlm = model_cfg.mlm
  if not 0.0 < mlm.mask_rate <= 1.0:
    config_errors.fail('model.mlm.mask_rate', mlm.mask_rate, 'must be in (0, 1]')
  if mlm.mask_prob < 0 or mlm.random_prob < 0 or mlm.mask_prob + mlm.random_prob > 1.0:
    config_errors.fail('model.mlm.mask_prob', mlm.mask_prob,
                       f'with random_prob={mlm.random_prob} must be >= 0 and sum to <= 1')


KIND = kinds.register_kind(kinds.ModelKind(
    name='encoder',
    build=EncoderLM,
    unit_shape=lambda model_cfg: (),
    dummy_batch=lambda model_cfg, batch_size=1, seq_len=None: kinds.layout_batch(
        model_cfg, (), batch_size, seq_len),
    synthetic_batch=_synthetic_batch,
    param_breakdown=param_breakdown,
    flops_per_target=flops_per_target,
    target_unit='tokens',
    featurizer=mlm_data.make_mlm_featurizer,
    generation=None,   # an encoder does not generate text
    validate=validate,
    reports_bits_per_byte=False,
    causal=False,
    config_sections=('model.mlm',),
))
