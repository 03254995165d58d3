"""The baseline LM: token embedding -> Transformer -> LM head (tied or separate)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stlm.data import featurize
from stlm.models import chunked_ce
from stlm.models import decoding
from stlm.models import depth
from stlm.models import kinds
from stlm.models import layers
from stlm.models import objective
from stlm.models import pause
from stlm.models import weight_sharing as sharing
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
    self.pause_embedding = pause.make_param(self, cfg)
    if not cfg.tie_embeddings:
      self.lm_head = layers.make_param(self, 'lm_head', layers.fan_in_init(),
                                       (cfg.hidden_dim, cfg.vocab_size), ('embed', 'vocab'), cfg)

  def features(self, inputs_BxT, segment_ids_BxT, positions_BxT, *, deterministic=True):
    """Final-norm hidden states B x T x D (classification pools the last position)."""
    return self.hidden(inputs_BxT, segment_ids_BxT, positions_BxT, deterministic=deterministic)

  def head(self, y_BxTxD):
    """Float32 logits B x T x V of final-normed core outputs (also the early exits' head)."""
    if self.cfg.tie_embeddings:
      return self.embed.attend(y_BxTxD)
    dtype = layers.dtype_of(self.cfg.dtype)
    # Accumulate in float32 so bfloat16 compute still gives float32 logits.
    logits_BxTxV = jnp.einsum('btd,dv->btv', y_BxTxD.astype(dtype), self.lm_head.astype(dtype),
                              preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits_BxTxV, layers.ACT_BxTxV)

  def head_weight_VxD(self):
    """The output layer's weight as V x D (the tied table, or the untied head transposed)."""
    if self.cfg.tie_embeddings:
      return self.embed.embedding
    return self.lm_head.T

  def chunked_target_scores(self, y_BxTxD, targets_BxT, loss_mask_BxT, chunk: int):
    """`target_scores` of the head without the B x T x V logits (model.ce_chunk).

    The loss mask tells it the training loss's cotangent, so its gradients come out of the
    forward pass (see chunked_ce).
    """
    B, T, D = y_BxTxD.shape
    logprobs_N, greedy_N = chunked_ce.target_scores(
        y_BxTxD.reshape(B * T, D), self.head_weight_VxD(), targets_BxT.reshape(B * T),
        chunk=chunk, weights_N=None if loss_mask_BxT is None else loss_mask_BxT.reshape(B * T),
        compute_dtype=layers.dtype_of(self.cfg.dtype))
    return logprobs_N.reshape(B, T), greedy_N.reshape(B, T)

  def hidden(self, inputs_BxT, segment_ids_BxT, positions_BxT, *, deterministic=True,
             decode=False):
    """Final hidden states B x T x D (after the final norm), input to the output layer."""
    return self._core(inputs_BxT, segment_ids_BxT, positions_BxT, deterministic=deterministic,
                      decode=decode)[0]

  def _core(self, inputs_BxT, segment_ids_BxT, positions_BxT, *, deterministic, decode):
    if self.pause_embedding is None:
      x_BxTxD = self.embed(inputs_BxT)
    else:
      x_BxTxD = pause.substitute(self.embed(pause.strip(inputs_BxT)), pause.is_pause(inputs_BxT),
                                 self.pause_embedding)
    return self.transformer(x_BxTxD, segment_ids_BxT, positions_BxT,
                            deterministic=deterministic, decode=decode, return_aux=True)

  def logits(self, inputs_BxT, segment_ids_BxT, positions_BxT, *, deterministic=True,
             decode=False):
    """Float32 next-token logits B x T x V (decode=True reads/writes the 'cache')."""
    return self.logits_and_layers(inputs_BxT, segment_ids_BxT, positions_BxT,
                                  deterministic=deterministic, decode=decode)[0]

  def logits_and_layers(self, inputs_BxT, segment_ids_BxT, positions_BxT, *,
                        deterministic=True, decode=False):
    """(logits B x T x V, layers used f32 B x T): early exit applied at inference."""
    y_BxTxD, aux = self._core(inputs_BxT, segment_ids_BxT, positions_BxT,
                              deterministic=deterministic, decode=decode)
    logits_BxTxV = self.head(y_BxTxD)
    layers_BxT = jnp.full(logits_BxTxV.shape[:2], float(self.cfg.num_layers), jnp.float32)
    threshold = float(self.cfg.early_exit_threshold)
    if deterministic and threshold > 0.0:
      exited_BxT = jnp.zeros(layers_BxT.shape, bool)
      for layer, _ in depth.early_exits(self.cfg):
        exit_logits = self.head(aux['exits'][layer])
        go_BxT = ~exited_BxT & (depth.exit_confidence(exit_logits) >= threshold)
        logits_BxTxV = jnp.where(go_BxT[..., None], exit_logits, logits_BxTxV)
        layers_BxT = jnp.where(go_BxT, float(layer), layers_BxT)
        exited_BxT |= go_BxT
    return logits_BxTxV, layers_BxT

  def __call__(self, batch, *, deterministic=True):
    y_BxTxD, aux = self._core(batch['inputs'], batch['segment_ids'], batch['positions'],
                              deterministic=deterministic, decode=False)
    # Kept only when the caller makes 'intermediates' mutable (distillation reads it).
    self.sow('intermediates', objective.HIDDEN, y_BxTxD)
    targets_BxT = batch['targets']
    chunk = self.cfg.ce_chunk
    if 'score_idx' in batch:  # the scorer asks for K positions per row only (kinds.Scoring)
      return self._gathered_scores(y_BxTxD, aux, batch, chunk)
    if chunk:
      logprobs_BxT, greedy_BxT = self.chunked_target_scores(y_BxTxD, targets_BxT,
                                                            batch.get('loss_mask'), chunk)
    else:
      logprobs_BxT, greedy_BxT = target_scores(self.head(y_BxTxD), targets_BxT)
    out = dict(logprobs=logprobs_BxT,
               units=jnp.ones(targets_BxT.shape, jnp.float32),
               greedy=greedy_BxT)

    def exit_scores(h_BxTxD):
      logits_BxTxV = self.head(h_BxTxD)
      return target_scores(logits_BxTxV, targets_BxT) + (depth.exit_confidence(logits_BxTxV),)

    out = depth.add_exit_outputs(self.cfg, out, aux, exit_scores, batch['loss_mask'],
                                 deterministic=deterministic)
    return depth.add_token_aux(out, aux, batch['loss_mask'])

  def _gathered_scores(self, y_BxTxD, aux, batch, chunk: int):
    """logprobs / greedy B x K at rows' positions `score_idx` (output layer at K, not T)."""
    if depth.early_exits(self.cfg):
      raise ValueError('score_idx: model.early_exit_layers need every position through the '
                       'exits\' heads; score with the full head (kinds.Scoring.gather=False)')
    idx_BxK = batch['score_idx'].astype(jnp.int32)
    y_BxKxD = jnp.take_along_axis(y_BxTxD, idx_BxK[..., None], axis=1)
    targets_BxK = jnp.take_along_axis(batch['targets'], idx_BxK, axis=1)
    if chunk:
      logprobs_BxK, greedy_BxK = self.chunked_target_scores(y_BxKxD, targets_BxK, None, chunk)
    else:
      logprobs_BxK, greedy_BxK = target_scores(self.head(y_BxKxD), targets_BxK)
    out = dict(logprobs=logprobs_BxK, units=jnp.ones(targets_BxK.shape, jnp.float32),
               greedy=greedy_BxK)
    return depth.add_token_aux(out, aux, batch['loss_mask'])


def scoring(model_cfg) -> kinds.Scoring:
  """Gathered scoring unless early exits need every position's head; packing always.

  Packing is exact: attention is masked by segment, positions restart per request, and
  inference-time mixture-of-depths routing decides per token (stlm/models/depth.py).
  """
  return kinds.Scoring(gather=not depth.early_exits(model_cfg), pack=True)


def param_breakdown(params, model_cfg) -> dict[str, Any]:
  """embedding = token table, head = untied LM head (0 when tied, tied=True), core = rest.

  With weight sharing, core_applied = the core's params counted once per layer they run in.
  """
  params = nn.unbox(params)
  total = kinds.count_params(params)
  embedding = kinds.count_params(params['embed'])
  head = kinds.count_params(params.get('lm_head', {}))
  out = dict(embedding=embedding, head=head, core=total - embedding - head, total=total,
             tied=bool(model_cfg.tie_embeddings))
  if sharing.mode(model_cfg) != 'none':
    out['core_applied'] = sharing.applied_params(params['transformer'], model_cfg)
  return out


def flops_per_target(model_cfg, breakdown) -> float:
  """6 x (core + the head matmul, which runs once per token even when tied) + attention.

  Shared layers cost compute in every layer: the core counts as `core_applied`.
  """
  m = model_cfg
  core = breakdown.get('core_applied', breakdown['core'])
  return 6 * (core + m.vocab_size * m.hidden_dim) + kinds.attention_flops_per_target(m)


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
    featurizer=lambda config, tokenizer: featurize.TokenFeaturizer(tokenizer,
                                                                   config.model.max_len),
    generation=decoding.generate_tokens,
    batched_generation=decoding.generate_tokens_batched,
    scoring=scoring,
    param_report=lambda params, model_cfg: sharing.report(
        nn.unbox(params)['transformer'], model_cfg),
))
