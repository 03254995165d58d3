"""How much a byte-pool model's decoder reads its core: information-only diagnostics, paired
on one trained model (the same params, with and without one change).

- mean-y cost: bits/byte added when every core output y of a batch (up to `batch_size`
  document windows) is replaced by the mean of y over its real chunk positions. The decoder
  keeps the bias it learned from the mean, so only the information in y is removed (zeroing
  y would remove the bias too and charge it to the core).
- shuffled-y cost: bits/byte added when each row reads another row's core outputs: the next
  row of the batch that holds real chunks (cyclically; a derangement, since the batch size
  is chosen so that no batch holds a single row), chunk t reading the other row's real chunk
  t mod its number of chunks, so every chunk of every document is still scored.
- per-slot bits: the model's bits/byte split by the slot class of the target symbol
  (stlm/models/byte_pool/slot_classes.py: first, later, end_of_chunk); each is the class's
  nats / ln 2 / the documents' UTF-8 bytes, so the three add up to the bits/byte. Per symbol
  (nats / ln 2 / symbols of the class) as well.
- grad ratio: global norm of the gradient of the held-out loss (nats per predicted symbol,
  as training) w.r.t. the byte encoder's params over the byte decoder's, on the first few
  batches.

Documents are scored as the scorer scores them (Scorer.document_spans: every target once,
windows with their full context; one window per row), every variant on the same batches, and
summed on the host in float64, so bits_per_byte here is the scorer's figure for the same
documents up to float32 rounding.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from stlm.eval import scorer as scorer_lib
from stlm.models import model_config
from stlm.models.byte_pool import params as byte_pool_params
from stlm.models.byte_pool import slot_classes

LN2 = math.log(2.0)


def batch_mean(y_BxTxD, segment_ids_BxT):
  """Every position gets the mean of y over the batch's real chunk positions."""
  real_BxTx1 = (segment_ids_BxT > 0)[..., None]
  total_D = jnp.sum(jnp.where(real_BxTx1, y_BxTxD.astype(jnp.float32), 0.0), axis=(0, 1))
  mean_D = total_D / jnp.maximum(jnp.sum(real_BxTx1), 1)
  return jnp.broadcast_to(mean_D.astype(y_BxTxD.dtype), y_BxTxD.shape)


def other_row(y_BxTxD, segment_ids_BxT):
  """Row r reads the next row holding real chunks (cyclically), position t that row's real
  position t mod its count; rows without real chunks keep their own (padding)."""
  T = segment_ids_BxT.shape[1]
  real_BxT = segment_ids_BxT > 0
  n_B = real_BxT.sum(1)
  has_B = n_B > 0
  rows_with_chunks = jnp.argsort(~has_B, stable=True)   # in order, then the empty ones
  rank_B = jnp.cumsum(has_B) - 1
  other_B = rows_with_chunks[(rank_B + 1) % jnp.maximum(has_B.sum(), 1)]
  real_positions_BxT = jnp.argsort(~real_BxT, axis=1, stable=True)   # real positions first
  t_BxT = jnp.arange(T)[None] % jnp.maximum(n_B[other_B], 1)[:, None]
  src_BxT = jnp.take_along_axis(real_positions_BxT[other_B], t_BxT, axis=1)
  return jnp.where(has_B[:, None, None], y_BxTxD[other_B[:, None], src_BxT], y_BxTxD)


# Variant name -> core transform (None: the model as trained).
VARIANTS = {'model': None, 'mean_y': batch_mean, 'shuffled_y': other_row}


def supported(model) -> bool:
  """Whether the model has the core-output hook and per-slot scores (the byte-pool LMs)."""
  return hasattr(model, 'core_transform') and hasattr(model, 'slot_class_scores')


def rows_per_batch(rows: int, preferred: int) -> int:
  """`preferred` rows per batch (at most `rows`), lowered until no batch holds a single row:
  a row alone in its batch has no other row to read core outputs from."""
  for size in range(min(preferred, rows), 1, -1):
    if rows % size != 1:
      return size
  raise ValueError(f'core diagnostics need at least 2 scored document windows to shuffle core '
                   f'outputs across rows, got {rows}')


def layout(model, params, featurizer, texts: Sequence[str], batch_size: int = 32):
  """(scorer, pieces, jobs) of the diagnostics' batches (`batches` builds them): one window
  per row, every row at the full window length (one bucket, so only the last batch is short),
  rows_per_batch(windows, batch_size) rows per batch."""
  make = lambda size: scorer_lib.Scorer(model, params, featurizer, batch_size=size,
                                        min_bucket=featurizer.max_len, pack=False,
                                        gather=False)
  scorer = make(batch_size)
  spans = [s for i, t in enumerate(texts) for s in scorer.document_spans(t, i)]
  scorer = make(rows_per_batch(len(scorer.layout(spans)[0]), batch_size))
  return (scorer,) + scorer.layout(spans)


def batches(scorer, pieces, jobs):
  """(batch, valid B x T: the chunks to count) of each job, in order."""
  for T, K, rows in jobs:
    yield scorer.make_batch(pieces, rows, T, K)[:2]


@functools.partial(jax.jit, static_argnums=0)
def variant_scores(model, params, batch, valid_BxT):
  """'<variant>/<class>' -> summed log p of the class's symbols per chunk (B x T, 0 outside
  valid) for every variant, and 'symbols/<class>' -> their counts."""
  out = {}
  for variant, transform in VARIANTS.items():
    classes = model.clone(core_transform=transform).apply(
        {'params': params}, batch, method='slot_class_scores')
    for name, (lp_BxT, n_BxT) in classes.items():
      out[f'{variant}/{name}'] = jnp.where(valid_BxT, lp_BxT, 0.0)
      if transform is None:
        out[f'symbols/{name}'] = jnp.where(valid_BxT, n_BxT, 0.0)
  return out


def _nll(params, model, batch, valid_BxT):
  out = model.apply({'params': params}, batch)
  return (-jnp.sum(jnp.where(valid_BxT, out['logprobs'], 0.0)),
          jnp.sum(jnp.where(valid_BxT, out['units'], 0.0)))


@functools.partial(jax.jit, static_argnums=0)
def loss_grad(model, params, batch, valid_BxT):
  """(gradient of the summed nats of the valid targets w.r.t. params, symbols predicted)."""
  return jax.grad(_nll, has_aux=True)(params, model, batch, valid_BxT)


def grad_norms(model, params, batch_list) -> tuple[float, float]:
  """Global gradient norms (byte encoder, byte decoder) of nats per predicted symbol over
  these (batch, valid) pairs together, as one training batch would see them."""
  total, units = None, 0.0
  for batch, valid in batch_list:
    g, u = loss_grad(model, params, batch, valid)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    units += float(u)
  norm = lambda part: float(optax.tree.norm(total[part])) / max(units, 1.0)
  return norm(byte_pool_params.ENCODER), norm(byte_pool_params.DECODER)


def diagnose(model, params, featurizer, texts: Sequence[str], *, batch_size: int = 32,
             grad_batches: int = 4) -> dict:
  """The diagnostics of the module docstring for one model on held-out `texts` (whole
  documents; empty ones are skipped, as stlm.eval.perplexity does)."""
  if not supported(model):
    raise ValueError(f'{type(model).__name__} has no core_transform / slot_class_scores: core '
                     'diagnostics need a byte-pool model (model.kind byte_pool)')
  # A typed config makes the module hashable: the jitted functions take it as a static
  # argument, so each model compiles once however often it is diagnosed.
  model = model.clone(cfg=model_config.of(model.cfg))
  params = nn.unbox(params)
  texts = [t for t in texts if t]
  scorer, pieces, jobs = layout(model, params, featurizer, texts, batch_size)
  sums: dict[str, float] = {}
  for batch, valid in batches(scorer, pieces, jobs):
    for key, v in variant_scores(model, params, batch, valid).items():
      sums[key] = sums.get(key, 0.0) + float(np.asarray(v, np.float64).sum())
  encoder_norm, decoder_norm = grad_norms(
      model, params, batches(scorer, pieces, jobs[:grad_batches]))
  nbytes = sum(len(t.encode('utf-8')) for t in texts)
  per_byte = LN2 * max(nbytes, 1)
  classes = slot_classes.CLASSES
  nats = lambda variant, c: -sums[f'{variant}/{c}']
  out = dict(documents=len(texts), bytes=nbytes, windows=len(pieces),
             rows_per_batch=scorer.batch_size,
             bits_per_byte=sum(nats('model', c) for c in classes) / per_byte,
             slot_bits_per_byte={c: nats('model', c) / per_byte for c in classes},
             slot_bits_per_symbol={c: nats('model', c) / LN2 / max(sums[f'symbols/{c}'], 1.0)
                                   for c in classes},
             slot_symbols={c: int(round(sums[f'symbols/{c}'])) for c in classes})
  for variant in VARIANTS:
    if variant == 'model':
      continue
    slot_cost = {c: (nats(variant, c) - nats('model', c)) / per_byte for c in classes}
    out[f'{variant}_slot_cost'] = slot_cost
    out[f'{variant}_cost'] = sum(nats(variant, c) - nats('model', c) for c in classes) / per_byte
    out[f'{variant}_bits_per_byte'] = out['bits_per_byte'] + out[f'{variant}_cost']
  out.update(encoder_grad_norm=encoder_norm, decoder_grad_norm=decoder_norm,
             grad_ratio=encoder_norm / decoder_norm if decoder_norm else float('inf'),
             grad_batches=min(grad_batches, len(jobs)))
  return out
