"""The baseline LM: token embedding -> Transformer -> LM head (tied or separate)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stlm.models import kinds
from stlm.models import layers
from stlm.models import transformer


def target_scores(logits_BxTxV, targets_BxT):
  """(log p(target) f32 BxT, target == argmax bool BxT) from float32 logits.

  Reads the logits with reductions only (logsumexp, a gather, argmax), so no second
  B x T x V float32 array (e.g. a full log_softmax) is materialized in the forward.
  """
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
  return target_logit_BxT - lse_BxT, greedy_BxT


class BaselineLM(nn.Module):
  """Decoder-only LM over BPE tokens; `cfg` is the model ConfigDict section."""
  cfg: Any

  def setup(self):
    cfg = self.cfg
    self.embed = layers.TokenEmbedding(cfg)
    self.transformer = transformer.Transformer(cfg, causal=True)
    if not cfg.tie_embeddings:
      self.lm_head = layers.make_param(self, 'lm_head', layers.fan_in_init(),
                                       (cfg.hidden_dim, cfg.vocab_size), ('embed', 'vocab'), cfg)

  def features(self, inputs_BxT, segment_ids_BxT, positions_BxT, *, deterministic=True):
    """Final-norm hidden states B x T x D (classification pools the last position)."""
    return self.transformer(self.embed(inputs_BxT), segment_ids_BxT, positions_BxT,
                            deterministic=deterministic)

  def logits(self, inputs_BxT, segment_ids_BxT, positions_BxT, *, deterministic=True,
             decode=False):
    """Float32 next-token logits B x T x V (decode=True reads/writes the 'cache')."""
    x_BxTxD = self.embed(inputs_BxT)
    y_BxTxD = self.transformer(x_BxTxD, segment_ids_BxT, positions_BxT,
                               deterministic=deterministic, decode=decode)
    if self.cfg.tie_embeddings:
      return self.embed.attend(y_BxTxD)
    dtype = layers.dtype_of(self.cfg.dtype)
    # Accumulate in float32 so bfloat16 compute still gives float32 logits.
    logits_BxTxV = jnp.einsum('btd,dv->btv', y_BxTxD.astype(dtype), self.lm_head.astype(dtype),
                              preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits_BxTxV, layers.ACT_BxTxV)

  def __call__(self, batch, *, deterministic=True):
    logits_BxTxV = self.logits(batch['inputs'], batch['segment_ids'], batch['positions'],
                               deterministic=deterministic)
    targets_BxT = batch['targets']
    logprobs_BxT, greedy_BxT = target_scores(logits_BxTxV, targets_BxT)
    return dict(logprobs=logprobs_BxT,
                units=jnp.ones(targets_BxT.shape, jnp.float32),
                greedy=greedy_BxT)


def param_breakdown(params, model_cfg) -> dict[str, Any]:
  """embedding = token table, head = untied LM head (0 when tied, tied=True), core = rest."""
  params = nn.unbox(params)
  total = kinds.count_params(params)
  embedding = kinds.count_params(params['embed'])
  head = kinds.count_params(params.get('lm_head', {}))
  return dict(embedding=embedding, head=head, core=total - embedding - head, total=total,
              tied=bool(model_cfg.tie_embeddings))


def flops_per_target(model_cfg, breakdown) -> float:
  """6 x (core + the head matmul, which runs once per token even when tied) + attention."""
  m = model_cfg
  return 6 * (breakdown['core'] + m.vocab_size * m.hidden_dim) \
      + kinds.attention_flops_per_target(m)


KIND = kinds.register_kind(kinds.ModelKind(
    name='baseline',
    build=BaselineLM,
    unit_shape=lambda model_cfg: (),
    dummy_batch=lambda model_cfg, batch_size=1, seq_len=None: kinds.layout_batch(
        model_cfg, (), batch_size, seq_len),
    synthetic_batch=lambda model_cfg, rng, leading_shape: kinds.random_batch(
        model_cfg, (), rng, leading_shape, 0, model_cfg.vocab_size),
    param_breakdown=param_breakdown,
    flops_per_target=flops_per_target,
    target_unit='tokens',
    featurizer='tokens',
    generation='tokens',
))
