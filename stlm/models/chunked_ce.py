"""Output layer + log-softmax scores without materialising the B x T x V logits.

`target_scores(h_NxD, w_VxD, targets_N, chunk=C)` returns, per position, log p(target)
(float32) and whether the target is the argmax, exactly as the plain
`logits = h @ w.T; logsumexp; gather; argmax` path does, but positions are processed
C at a time, so only C x V float32 logits exist at once (a lax.scan over position chunks).

Gradient (jax.custom_vjp). d log p(t_n) / d logits_n = onehot(t_n) - p_n, so for a
cotangent g_n the logit gradient of a chunk is (-g p) with g added at the target (a
C-element scatter, no one-hot matrix), followed by the two matmuls for dh and dW.

Training differentiates -sum(logprobs * loss_mask), so the cotangent is known before the
backward pass: g = -loss_mask. When `weights_N` (the loss mask) is given, the forward
pass already computes the gradients for g = -weights while each chunk's logits are still
in cache (one pass over the vocabulary: 6 N D V FLOPs like the plain path, instead of the
8 N D V of recomputing the logits in the backward). The backward checks at run time that
the cotangent really is -weights and otherwise recomputes the chunk logits for the
cotangent it got (lax.cond), so the function is exact for any use of its outputs.
"""

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp


def plain_target_scores(logits_NxV, targets_N):
  """(log p(target) f32, target == argmax) from full float32 logits (the reference)."""
  lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  target_logit_N = jnp.take_along_axis(logits_NxV, targets_N[..., None], axis=-1)[..., 0]
  greedy_N = jnp.argmax(logits_NxV, axis=-1) == targets_N
  return target_logit_N - lse_N, greedy_N


def _chunk_logits(h_CxD, w_VxD, compute_dtype):
  # Inputs in the compute dtype, accumulation and result in float32 (as the plain head).
  return jnp.einsum('cd,vd->cv', h_CxD.astype(compute_dtype), w_VxD.astype(compute_dtype),
                    preferred_element_type=jnp.float32)


def _chunk_scores(logits_CxV, t_C):
  max_C = jnp.max(logits_CxV, axis=-1)
  lse_C = max_C + jnp.log(jnp.sum(jnp.exp(logits_CxV - max_C[:, None]), axis=-1))
  target_logit_C = jnp.take_along_axis(logits_CxV, t_C[:, None], axis=-1)[:, 0]
  greedy_C = jnp.argmax(logits_CxV, axis=-1) == t_C
  return target_logit_C - lse_C, greedy_C, lse_C


def _chunk_grads(logits_CxV, lse_C, t_C, coef_C, h_CxD, w_VxD, compute_dtype):
  """(dh C x D, dW V x D) for a logit gradient coef * (p - onehot(t))."""
  dlogits_CxV = coef_C[:, None] * jnp.exp(logits_CxV - lse_C[:, None])
  dlogits_CxV = dlogits_CxV.at[jnp.arange(t_C.shape[0]), t_C].add(-coef_C)
  dlogits_CxV = dlogits_CxV.astype(compute_dtype)
  dh_CxD = jnp.einsum('cv,vd->cd', dlogits_CxV, w_VxD.astype(compute_dtype),
                      preferred_element_type=jnp.float32)
  dw_VxD = jnp.einsum('cv,cd->vd', dlogits_CxV, h_CxD.astype(compute_dtype),
                      preferred_element_type=jnp.float32)
  return dh_CxD, dw_VxD


def _split(x_N, chunk, fill=0):
  """N -> (N/C) x C (padded with `fill`)."""
  n = x_N.shape[0]
  pad = (-n) % chunk
  if pad:
    x_N = jnp.pad(x_N, [(0, pad)] + [(0, 0)] * (x_N.ndim - 1), constant_values=fill)
  return x_N.reshape((-1, chunk) + x_N.shape[1:])


def _forward(h_NxD, w_VxD, t_N, coef_N, chunk, compute_dtype, with_grads):
  """Scan over position chunks; with_grads adds dh, dW for logit gradient coef*(p - onehot)."""
  n = h_NxD.shape[0]
  xs = (_split(h_NxD, chunk), _split(t_N, chunk), _split(coef_N, chunk))

  def body(dw_acc, x):
    h_CxD, t_C, coef_C = x
    logits_CxV = _chunk_logits(h_CxD, w_VxD, compute_dtype)
    lp_C, greedy_C, lse_C = _chunk_scores(logits_CxV, t_C)
    if not with_grads:
      return dw_acc, (lp_C, greedy_C, lse_C)
    dh_CxD, dw_VxD = _chunk_grads(logits_CxV, lse_C, t_C, coef_C, h_CxD, w_VxD, compute_dtype)
    return dw_acc + dw_VxD, (lp_C, greedy_C, lse_C, dh_CxD)

  dw0 = jnp.zeros(w_VxD.shape, jnp.float32) if with_grads else jnp.zeros((), jnp.float32)
  dw_VxD, ys = jax.lax.scan(body, dw0, xs)
  ys = tuple(y.reshape((-1,) + y.shape[2:])[:n] for y in ys)
  return dw_VxD, ys


def _recompute_grads(h_NxD, w_VxD, t_N, lse_N, coef_N, chunk, compute_dtype):
  """Backward for an arbitrary cotangent: the chunk logits are computed again."""
  n = h_NxD.shape[0]
  xs = (_split(h_NxD, chunk), _split(t_N, chunk), _split(lse_N, chunk), _split(coef_N, chunk))

  def body(dw_acc, x):
    h_CxD, t_C, lse_C, coef_C = x
    logits_CxV = _chunk_logits(h_CxD, w_VxD, compute_dtype)
    dh_CxD, dw_VxD = _chunk_grads(logits_CxV, lse_C, t_C, coef_C, h_CxD, w_VxD, compute_dtype)
    return dw_acc + dw_VxD, dh_CxD

  dw_VxD, dh = jax.lax.scan(body, jnp.zeros(w_VxD.shape, jnp.float32), xs)
  return dh.reshape(-1, h_NxD.shape[1])[:n], dw_VxD


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _scores(h_NxD, w_VxD, t_N, weights_N, chunk, compute_dtype, speculate):
  zeros_N = jnp.zeros(t_N.shape, jnp.float32)
  _, (lp_N, greedy_N, _) = _forward(h_NxD, w_VxD, t_N, zeros_N, chunk, compute_dtype, False)
  del weights_N, speculate
  return lp_N, greedy_N


def _scores_fwd(h_NxD, w_VxD, t_N, weights_N, chunk, compute_dtype, speculate):
  if not speculate:
    _, (lp_N, greedy_N, lse_N) = _forward(h_NxD, w_VxD, t_N, weights_N, chunk, compute_dtype,
                                          False)
    return (lp_N, greedy_N), (h_NxD, w_VxD, t_N, weights_N, lse_N, None, None)
  # Speculate the cotangent -weights (the training loss): gradients come out of this pass.
  dw_VxD, (lp_N, greedy_N, lse_N, dh_NxD) = _forward(
      h_NxD, w_VxD, t_N, weights_N, chunk, compute_dtype, True)
  res = (h_NxD, w_VxD, t_N, weights_N, lse_N, dh_NxD, dw_VxD)
  return (lp_N, greedy_N), res


_TRUSTED = contextvars.ContextVar('stlm_chunked_ce_trusted_cotangent', default=False)


@contextlib.contextmanager
def trusted_training_cotangent():
  """Within this block (at trace time), the backward takes the speculated gradients without
  checking that the cotangent is -weights. For callers that differentiate exactly the
  training loss -sum(logprobs * weights) under `vmap`: there the check's lax.cond has a
  batched predicate, which runs both branches, the recomputation included."""
  token = _TRUSTED.set(True)
  try:
    yield
  finally:
    _TRUSTED.reset(token)


def _scores_bwd(chunk, compute_dtype, speculate, res, cotangents):
  h_NxD, w_VxD, t_N, weights_N, lse_N, dh_NxD, dw_VxD = res
  g_N = cotangents[0].astype(jnp.float32)

  def recompute():
    return _recompute_grads(h_NxD, w_VxD, t_N, lse_N, -g_N, chunk, compute_dtype)

  if speculate and _TRUSTED.get():
    pass   # the speculated dh, dW (see trusted_training_cotangent)
  elif speculate:
    dh_NxD, dw_VxD = jax.lax.cond(jnp.all(g_N == -weights_N), lambda: (dh_NxD, dw_VxD),
                                  recompute)
  else:
    dh_NxD, dw_VxD = recompute()
  zero_t = jnp.zeros(t_N.shape, jax.dtypes.float0)
  return (dh_NxD.astype(h_NxD.dtype), dw_VxD.astype(w_VxD.dtype), zero_t,
          jnp.zeros_like(weights_N))


_scores.defvjp(_scores_fwd, _scores_bwd)


def target_scores(h_NxD, w_VxD, targets_N, *, chunk: int, weights_N=None,
                  compute_dtype=jnp.float32):
  """(log p(target) f32 N, target == argmax bool N) of logits h @ w.T, chunk positions at a time.

  h_NxD: final hidden states (any leading shape is flattened by the caller); w_VxD: the
  output-layer weight (the tied embedding table, or the untied head transposed);
  weights_N: the loss weight of each position if the caller differentiates
  -sum(logprobs * weights) (training); any other cotangent is still exact, only slower.
  """
  if chunk <= 0:
    raise ValueError(f'chunk must be positive, got {chunk}')
  n = h_NxD.shape[0]
  chunk = min(chunk, n)
  speculate = weights_N is not None
  if weights_N is None:
    weights_N = jnp.zeros((n,), jnp.float32)
  weights_N = jax.lax.stop_gradient(weights_N.astype(jnp.float32))
  return _scores(h_NxD, w_VxD, targets_N.astype(jnp.int32), weights_N, chunk, compute_dtype,
                 speculate)
