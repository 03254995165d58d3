"""KL(teacher_T || student_T) of two output layers without either's N x V logits.

`chunked_kl(hs_NxD, ws_VxD, ht_NxD, wt_VxD, weights_N, temperature=T, chunk=C, top_k=k)` is
sum_n weights_n * KL(softmax(zt_n / T) || softmax(zs_n / T)), with z = h @ w.T, computed C
positions at a time (a lax.scan), so at most C x V logits of each model exist at once. The
scan body is rematerialised (jax.checkpoint): the backward pass recomputes a chunk's logits
instead of keeping every chunk's, so its memory is also C x V.

top_k > 0 keeps the teacher's k largest logits per position, renormalised (its distribution
restricted to its top k), against the student's full distribution at those tokens.
"""

import functools

import jax
import jax.numpy as jnp


def plain_kl(zs_NxV, zt_NxV, weights_N, temperature: float, top_k: int = 0):
  """The reference: the same sum from full float32 logits."""
  ls_NxV = jax.nn.log_softmax(zs_NxV / temperature, axis=-1)
  if top_k:
    zt_NxK, idx_NxK = jax.lax.top_k(zt_NxV, top_k)
    lt_NxK = jax.nn.log_softmax(zt_NxK / temperature, axis=-1)
    ls_NxK = jnp.take_along_axis(ls_NxV, idx_NxK, axis=-1)
    kl_N = jnp.sum(jnp.exp(lt_NxK) * (lt_NxK - ls_NxK), axis=-1)
  else:
    lt_NxV = jax.nn.log_softmax(zt_NxV / temperature, axis=-1)
    kl_N = jnp.sum(jnp.exp(lt_NxV) * (lt_NxV - ls_NxV), axis=-1)
  return jnp.sum(kl_N * weights_N)


def _split(x_N, chunk):
  pad = (-x_N.shape[0]) % chunk
  if pad:
    x_N = jnp.pad(x_N, [(0, pad)] + [(0, 0)] * (x_N.ndim - 1))
  return x_N.reshape((-1, chunk) + x_N.shape[1:])


def _logits(h_CxD, w_VxD, compute_dtype):
  return jnp.einsum('cd,vd->cv', h_CxD.astype(compute_dtype), w_VxD.astype(compute_dtype),
                    preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=('temperature', 'chunk', 'top_k', 'compute_dtype'))
def chunked_kl(hs_NxD, ws_VxD, ht_NxD, wt_VxD, weights_N, *, temperature: float, chunk: int,
               top_k: int = 0, compute_dtype=jnp.float32):
  """See the module docstring; padded positions carry weight 0."""
  xs = (_split(hs_NxD, chunk), _split(ht_NxD, chunk),
        _split(weights_N.astype(jnp.float32), chunk))

  @jax.checkpoint
  def body(total, x):
    hs_CxD, ht_CxD, w_C = x
    zs_CxV = _logits(hs_CxD, ws_VxD, compute_dtype)
    zt_CxV = _logits(ht_CxD, wt_VxD, compute_dtype)
    return total + plain_kl(zs_CxV, zt_CxV, w_C, temperature, top_k), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return total
