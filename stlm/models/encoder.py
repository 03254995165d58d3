"""The encoder LM: token embedding (+1 [MASK] row) -> bidirectional Transformer -> tied head.

Masked-language modelling (BERT): the featurizer (stlm/data/mlm.py) replaces some input
tokens, `targets` hold the original tokens, and `loss_mask` is 1 only on the chosen
positions, so the shared loss (stlm.train.step.loss_sums) counts only those.

The [MASK] id is `vocab_size` (one past the tokenizer's last id): the embedding table has
one extra row for it, so any tokenizer of the codebase (GPT-2, sentencepiece, bytes) works
unchanged. The head scores only the tokenizer's `vocab_size` ids: [MASK] is never a target.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from stlm.models import baseline
from stlm.models import layers
from stlm.models import transformer


def mask_id(vocab_size: int) -> int:
  """The [MASK] input id of a model whose tokenizer has `vocab_size` ids."""
  return int(vocab_size)


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
                greedy=greedy_BxT)
