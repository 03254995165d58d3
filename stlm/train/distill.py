"""Logit distillation from a teacher export inside the train step (`train.distill`).

The objective per predicted token is (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)
(Hinton et al. 2015; DistilBERT), T = `train.distill.temperature`; the T^2 keeps the soft
term's gradient on the scale of the hard one's. The teacher is a frozen export with the
student's tokenizer; its parameters are an argument of the jitted step, sharded like the
student's by their logical axes, and never differentiated. The KL is `chunked_kl` over the
two output layers: neither model's B x T x V logits exist. `train.distill.top_k > 0` keeps the
teacher's k most likely tokens per position (renormalised) instead of its whole distribution.

Both models need a token output layer (`head_weight_VxD`) and final hidden states: the
baseline kind has them. Logged: `distill_kl` (per token, at temperature T) beside the usual
`loss`, which stays the cross-entropy alone, so runs with and without distillation compare.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from stlm.config import errors
from stlm.models import chunked_kl
from stlm.models import layers



def enabled(config) -> bool:
  return bool(config.train.distill.get('teacher', ''))


def _distillable(model) -> bool:
  return hasattr(model, 'head_weight_VxD') and hasattr(model, 'hidden')


def check(config, vocabulary: bool = True) -> None:
  """ConfigErrors naming the key, before any work; reads the teacher's config, not its params.
  vocabulary: also compare the vocabulary sizes (once the run's tokenizer has set it)."""
  d = config.train.distill
  if not 0.0 <= float(d.alpha) <= 1.0:
    errors.fail('train.distill.alpha', d.alpha, 'must be in [0, 1]')
  if float(d.temperature) <= 0:
    errors.fail('train.distill.temperature', d.temperature, 'must be > 0')
  if int(d.top_k) < 0:
    errors.fail('train.distill.top_k', d.top_k, 'must be >= 0 (0 = the whole distribution)')
  if not enabled(config):
    if d.get('required', False):
      errors.fail('train.distill.teacher', d.teacher,
                  'this config distils: give the teacher export (--config.train.distill.teacher=)')
    return
  from stlm import export  # pylint: disable=g-import-not-at-top
  from stlm.models import factory  # pylint: disable=g-import-not-at-top
  try:
    teacher = export.check_export(d.teacher, 'train.distill.teacher')
  except export.BadExportError as e:
    raise errors.ConfigError(f'config.{e}') from None
  for who, cfg in (('the student', config.model), ('the teacher', teacher.model)):
    if not _distillable(factory.build_model(cfg)):
      errors.fail('train.distill.teacher', d.teacher,
                  f'{who} (model.kind={cfg.kind!r}) has no token output layer to distil')
    if int(cfg.pause_every):
      errors.fail('train.distill.teacher', d.teacher,
                  f'{who} inserts pause tokens; the two models must read the same tokens')
  if teacher.tokenizer.to_dict() != config.tokenizer.to_dict() and not (
      teacher.tokenizer.kind == config.tokenizer.kind == 'gpt2'):
    errors.fail('train.distill.teacher', d.teacher,
                f'its tokenizer {teacher.tokenizer.to_dict()} is not the student\'s '
                f'{config.tokenizer.to_dict()}')
  if vocabulary and int(teacher.model.vocab_size) != int(config.model.vocab_size):
    errors.fail('train.distill.teacher', d.teacher,
                f'its vocabulary ({teacher.model.vocab_size}) is not the student\'s '
                f'({config.model.vocab_size})')


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The frozen teacher: module, config, and its parameters on the host (unboxed)."""
  model: nn.Module
  config: object
  params: object
  boxed_abstract: object      # logical axes of its params, for their shardings

  @classmethod
  def load(cls, config) -> 'Teacher':
    from stlm import export  # pylint: disable=g-import-not-at-top
    from stlm.models import factory  # pylint: disable=g-import-not-at-top
    exported = export.load_export(config.train.distill.teacher, 'train.distill.teacher')
    boxed = jax.eval_shape(lambda: factory.init_boxed_params(
        exported.model, exported.config.model, jax.random.key(0)))
    return cls(exported.model, exported.config, nn.unbox(exported.params), boxed)


def kl_sum(model, params, hidden_BxTxD, batch, teacher_model, teacher_params, distill_cfg,
           model_cfg):
  """Summed KL(teacher_T || student_T) over the batch's loss-masked positions."""
  ht_BxTxD = jax.lax.stop_gradient(teacher_model.apply(
      {'params': teacher_params}, batch['inputs'], batch['segment_ids'], batch['positions'],
      deterministic=True, method='hidden'))
  wt_VxD = jax.lax.stop_gradient(teacher_model.apply({'params': teacher_params},
                                                     method='head_weight_VxD'))
  ws_VxD = model.apply({'params': params}, method='head_weight_VxD')
  if float(distill_cfg.alpha) == 0:   # logged, not trained on: the gradient stays the CE's
    hidden_BxTxD, ws_VxD = jax.lax.stop_gradient((hidden_BxTxD, ws_VxD))
  B, T, D = hidden_BxTxD.shape
  return chunked_kl.chunked_kl(
      hidden_BxTxD.reshape(B * T, D), ws_VxD, ht_BxTxD.reshape(B * T, ht_BxTxD.shape[-1]),
      wt_VxD, batch['loss_mask'].reshape(B * T), temperature=float(distill_cfg.temperature),
      chunk=int(model_cfg.ce_chunk) or T, top_k=int(distill_cfg.top_k),
      compute_dtype=jnp.dtype(layers.dtype_of(model_cfg.dtype)))


def objective(nll, kl, distill_cfg):
  """(1 - alpha) * nll + alpha * T^2 * kl, both summed over predicted tokens."""
  alpha, t = float(distill_cfg.alpha), float(distill_cfg.temperature)
  return (1.0 - alpha) * nll + alpha * t * t * kl
