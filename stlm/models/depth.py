"""Depth options of the transformer core: LayerSkip and mixture of depths.

LayerSkip (Elhoushi et al. 2024): layer dropout whose rate rises linearly with depth to
`model.layer_drop_max` (training only; a dropped block keeps its residual input), and
early-exit losses through the model's own head at `model.early_exit_layers`. At inference
a token exits at the first listed layer whose head is at least `model.early_exit_threshold`
confident (0 = never exit). The core computes every layer either way (one dense batched
forward), so exiting changes the outputs and the reported layers per token, not the
wall-clock; a compute-saving exit needs per-token control flow this code does not have.

Mixture of depths (Raposo et al. 2024): every `model.mod_every`-th block is routed. A
linear router scores each token; in training the block processes only the top-k tokens of
each row (k = ceil(model.mod_capacity * T)), the others pass on their residual, and the
block's output is scaled by sigmoid(router) so the router learns through the LM loss.
Top-k over a row looks at later tokens, so inference (deterministic) decides per token with
the paper's auxiliary predictor instead: a small MLP on the (stop-gradient) block input,
trained with a binary cross-entropy to predict top-k membership. A token is processed when
the predictor says so; unprocessed tokens are hidden from the block's attention, as in
training. So in inference an earlier token's output never depends on a later token.

Everything here is inert at the defaults (no params, no rng draws, same outputs).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stlm.models import layers

# Segment id that unprocessed tokens get inside a routed block at inference: real segments
# are >= 1 and padding is 0, so processed tokens never see them.
_SKIPPED_SEGMENT = -1


def layer_drop_rates(cfg) -> tuple[float, ...]:
  """Per-layer drop rate: 0 at the first layer rising linearly to layer_drop_max at the last."""
  p_max, n = float(cfg.layer_drop_max), cfg.num_layers
  if n == 1:
    return (p_max,)
  return tuple(p_max * i / (n - 1) for i in range(n))


def _int_list(text, key):
  text = str(text).strip()
  if not text:
    return ()
  try:
    return tuple(int(s) for s in text.split(','))
  except ValueError:
    raise ValueError(f'model.{key}={text!r}: need a comma list of integers, e.g. "1,2"') from None


def early_exits(cfg) -> tuple[tuple[int, float], ...]:
  """(layer, loss weight) per early exit; layer l means the output of block_{l-1} (1-based)."""
  exit_layers = _int_list(cfg.early_exit_layers, 'early_exit_layers')
  if not exit_layers:
    return ()
  text = str(cfg.early_exit_weights).strip()
  try:
    weights = tuple(float(s) for s in text.split(',')) if text else (1.0,)
  except ValueError:
    raise ValueError(f'model.early_exit_weights={text!r}: need a comma list of numbers') from None
  if len(weights) == 1:
    weights = weights * len(exit_layers)
  if len(weights) != len(exit_layers):
    raise ValueError(f'model.early_exit_weights={text!r}: give one weight, or one per layer of '
                     f'model.early_exit_layers={cfg.early_exit_layers!r}')
  for l in exit_layers:
    if not 1 <= l < cfg.num_layers:
      raise ValueError(f'model.early_exit_layers: layer {l} must be in 1..{cfg.num_layers - 1} '
                       '(the last layer is the model itself)')
  if list(exit_layers) != sorted(set(exit_layers)):
    raise ValueError('model.early_exit_layers must be increasing without repeats, got '
                     f'{exit_layers}')
  return tuple(zip(exit_layers, weights))


def is_routed(cfg, i: int) -> bool:
  """Whether block_i is a mixture-of-depths block (block_1, block_3, ... for mod_every=2)."""
  capacity, every = float(cfg.mod_capacity), int(cfg.mod_every)
  return capacity > 0.0 and i % every == every - 1


def capacity_k(cfg, T: int) -> int:
  return max(1, min(T, math.ceil(float(cfg.mod_capacity) * T)))


def validate(cfg) -> None:
  """Raises ValueError naming the key for impossible depth settings."""
  if not 0.0 <= float(cfg.layer_drop_max) < 1.0:
    raise ValueError(f'model.layer_drop_max={cfg.layer_drop_max!r} must be in [0, 1)')
  if cfg.layer_drop_per not in ('example', 'batch'):
    raise ValueError(f'model.layer_drop_per={cfg.layer_drop_per!r}: choose example or batch')
  early_exits(cfg)
  if not 0.0 <= float(cfg.early_exit_threshold) <= 1.0:
    raise ValueError(f'model.early_exit_threshold={cfg.early_exit_threshold!r} must be in '
                     '[0, 1] (0 = never exit)')
  if not 0.0 <= float(cfg.mod_capacity) <= 1.0:
    raise ValueError(f'model.mod_capacity={cfg.mod_capacity!r} must be in [0, 1] (0 = off)')
  if int(cfg.mod_every) < 1:
    raise ValueError(f'model.mod_every={cfg.mod_every!r} must be >= 1')
  per_layer = [key for key, off in (('layer_drop_max', 0.0), ('early_exit_layers', ''),
                                    ('mod_capacity', 0.0))
               if cfg[key] not in (off, None, 0)]
  if cfg.scan_layers and per_layer:
    raise ValueError(f'model.scan_layers=True compiles one block for all layers, so it cannot '
                     f'vary them per layer: set model.scan_layers=False to use model.{per_layer[0]}')


def layer_drop(module: nn.Module, x_old, x_new, rate: float, *, deterministic: bool):
  """Keeps x_new, or (with probability `rate`, per example or per batch) the block's input."""
  if deterministic or rate <= 0.0:
    return x_new
  B = x_new.shape[0]
  shape = (B, 1, 1) if module.cfg.layer_drop_per == 'example' else (1, 1, 1)
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, shape)
  return jnp.where(keep, x_new, x_old)


class Router(nn.Module):
  """Router (score per token) and the auxiliary causal predictor of a mixture-of-depths block."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BxTxD, real_BxT, *, cache_L=None, cache_index=None, write_cache=True):
    """(router score, predictor logit, inference choice, its cache B x L or None), all BxT.

    The inference choice is the predictor's (logit > 0, real tokens only). With cache_L
    (decoding) the choices of every cached slot are kept in the 'cache' collection.
    """
    cfg = self.cfg
    D = cfg.hidden_dim
    x = x_BxTxD.astype(jnp.float32)
    w = layers.make_param(self, 'router', layers.fan_in_init(), (D, 1), ('embed', None), cfg)
    score_BxT = jnp.einsum('btd,dk->btk', x, w.astype(jnp.float32))[..., 0]
    # The predictor learns from its own loss only: it must not move the residual stream.
    h = jax.lax.stop_gradient(x)
    hid = max(8, D // 4)
    w1 = layers.make_param(self, 'predictor_in', layers.fan_in_init(), (D, hid),
                           ('embed', None), cfg)
    w2 = layers.make_param(self, 'predictor_out', layers.fan_in_init(), (hid, 1), (None, None),
                           cfg)
    b2 = layers.make_param(self, 'predictor_bias', nn.initializers.zeros, (1,), (None,), cfg)
    pred_BxT = (jnp.einsum('bth,hk->btk', nn.gelu(h @ w1), w2) + b2)[..., 0]
    sel_BxT = (pred_BxT > 0.0) & real_BxT
    sel_BxL = None
    if cache_L is not None:
      B = sel_BxT.shape[0]
      var = self.variable('cache', 'selected', lambda: jnp.zeros((B, cache_L), bool))
      sel_BxL = jax.lax.dynamic_update_slice(var.value, sel_BxT, (0, cache_index))
      if write_cache:
        var.value = sel_BxL
    return score_BxT, pred_BxT, sel_BxT, sel_BxL


def routed_block(block, router: Router, x_BxTxD, segment_ids_BxT, positions_BxT, *,
                 deterministic: bool, decode_mask_Bx1xTxL=None, cache_index=None,
                 write_cache=True):
  """One mixture-of-depths block: returns (x_BxTxD, token stats, token aux loss) dicts."""
  cfg = block.cfg
  B, T, _ = x_BxTxD.shape
  real_BxT = segment_ids_BxT > 0
  cache_L = None if decode_mask_Bx1xTxL is None else decode_mask_Bx1xTxL.shape[-1]
  score_BxT, pred_BxT, sel_BxT, sel_BxL = router(x_BxTxD, real_BxT, cache_L=cache_L,
                                                 cache_index=cache_index,
                                                 write_cache=write_cache)
  gate_BxT = jax.nn.sigmoid(score_BxT)
  if not deterministic:
    # Training: top-k of the row (padding never chosen), gathered in order so causal
    # attention over the chosen tokens is causal in the original order.
    k = capacity_k(cfg, T)
    masked = jnp.where(real_BxT, score_BxT, -jnp.inf)
    idx_Bxk = jnp.sort(jax.lax.top_k(masked, k)[1], axis=-1)
    take = lambda a: jnp.take_along_axis(a, idx_Bxk.reshape(idx_Bxk.shape + (1,) * (a.ndim - 2)),
                                         axis=1)
    x_k = take(x_BxTxD)
    y_k = block(x_k, take(segment_ids_BxT), take(positions_BxT), deterministic=deterministic)
    delta_k = (y_k - x_k) * take(gate_BxT)[..., None].astype(y_k.dtype)
    rows = jnp.arange(B)[:, None]
    x_out = x_BxTxD.at[rows, idx_Bxk].add(delta_k.astype(x_BxTxD.dtype))
    sel_BxT = jnp.zeros((B, T), bool).at[rows, idx_Bxk].set(True) & real_BxT
    # The predictor learns top-k membership (binary cross-entropy on its logits).
    label = sel_BxT.astype(jnp.float32)
    bce_BxT = sigmoid_bce(pred_BxT, label)
  else:
    if decode_mask_Bx1xTxL is not None:
      # Processed queries see processed keys only; the others keep the plain mask (their
      # output is discarded, but a row must not be empty).
      mask = decode_mask_Bx1xTxL & (sel_BxL[:, None, None, :] | ~sel_BxT[:, None, :, None])
      y = block(x_BxTxD, segment_ids_BxT, positions_BxT, deterministic=True,
                decode_mask_Bx1xTxL=mask, cache_index=cache_index, write_cache=write_cache)
    else:
      seg = jnp.where(sel_BxT, segment_ids_BxT, _SKIPPED_SEGMENT)
      y = block(x_BxTxD, seg, positions_BxT, deterministic=True)
    delta = (y - x_BxTxD) * gate_BxT[..., None].astype(y.dtype)
    # where, not multiply: an unprocessed token's discarded branch must not leak (NaN or not).
    x_out = jnp.where(sel_BxT[..., None], x_BxTxD + delta, x_BxTxD)
    bce_BxT = jnp.zeros((B, T), jnp.float32)
  return x_out, sel_BxT.astype(jnp.float32), bce_BxT


def sigmoid_bce(logits, labels):
  """Binary cross-entropy with logits (numerically stable), elementwise."""
  return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def exit_confidence(logits_xV):
  """Max softmax probability (f32) of logits [..., V]: the head's confidence."""
  logits = logits_xV.astype(jnp.float32)
  return jnp.exp(jnp.max(logits, -1) - jax.nn.logsumexp(logits, -1))


def add_exit_outputs(cfg, out, aux, score_fn, mask_BxT, *, deterministic: bool):
  """Early-exit losses, statistics and (inference, threshold > 0) the exited outputs.

  score_fn(h_BxTxD) -> (logprobs BxT, greedy BxT, confidence BxT) through the model's own
  head; `aux['exits']` holds the final-normed hidden state at each exit layer. Adds
  `extra_nll` (weighted exit nats, the LayerSkip objective), `stats['exit{l}_nll']`
  (nats per target at layer l) and `stats['layers_used']`; threshold 0 leaves logprobs and
  greedy exactly the full model's.
  """
  exits = early_exits(cfg)
  if not exits:
    return out
  mask = mask_BxT.astype(jnp.float32)
  stats = dict(out.get('stats', {}))
  extra = out.get('extra_nll', jnp.zeros((), jnp.float32))
  threshold = float(cfg.early_exit_threshold)
  L = cfg.num_layers
  layers_BxT = jnp.full(mask.shape, float(L), jnp.float32)
  logprobs, greedy = out['logprobs'], out['greedy']
  exited_BxT = jnp.zeros(mask.shape, bool)
  for layer, weight in exits:
    lp_BxT, gr_BxT, conf_BxT = score_fn(aux['exits'][layer])
    nll = -jnp.sum(lp_BxT * mask)
    stats[f'exit{layer}_nll'] = nll
    extra = extra + weight * nll
    if deterministic and threshold > 0.0:
      go = ~exited_BxT & (conf_BxT >= threshold)
      logprobs = jnp.where(go, lp_BxT, logprobs)
      greedy = jnp.where(go, gr_BxT, greedy)
      layers_BxT = jnp.where(go, float(layer), layers_BxT)
      exited_BxT |= go
  if deterministic and threshold > 0.0:
    # First-exit-wins above: later exits only fill tokens no earlier exit took.
    out = dict(out, logprobs=logprobs, greedy=greedy)
  stats['layers_used'] = jnp.sum(layers_BxT * mask)
  return dict(out, extra_nll=extra, stats=stats)


def add_token_aux(out, aux, mask_BxT):
  """Sums the core's per-token statistics and aux losses (mixture of depths) into `out`."""
  if not aux['token_stats'] and not aux['token_extra']:
    return out
  mask = mask_BxT.astype(jnp.float32)
  stats = dict(out.get('stats', {}))
  for name, v_BxT in aux['token_stats'].items():
    stats[name] = jnp.sum(v_BxT * mask)
  extra = out.get('extra_nll', jnp.zeros((), jnp.float32))
  for v_BxT in aux['token_extra'].values():
    extra = extra + jnp.sum(v_BxT * mask)
  return dict(out, stats=stats, extra_nll=extra)


def new_aux():
  return dict(exits={}, token_stats={}, token_extra={})
