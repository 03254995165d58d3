"""Held-out response bits per byte of instruction data (what SFT validation reports).

The instruction file is read by the trainer's own source (`data.source='instruct'`): the
same items are held out (a hash of each conversation, `val_fraction`), rendered by the same
template, featurized by the export's kind with the response mask, and scored by the
trainer's loss formula (stlm/models/objective.py). So an SFT export scores here exactly what
its run's validation said, and a pretrained export (given a template) scores the same
targets.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from stlm.config import schema
from stlm.data import chat
from stlm.data import pipeline
from stlm.data import sft
from stlm.models import objective


def response_config(config, path: str, template: str = '', layout: str = 'auto',
                    val_fraction: float | None = None, batch_size: int = 8, data_dir: str = ''
                    ) -> ml_collections.ConfigDict:
  """The export's config pointed at instruction file `path`. The template and held-out
  fraction are the export's own (those it was tuned with) unless given; an export that was
  not instruction-tuned needs a template, and holds out the schema's default fraction."""
  c = ml_collections.ConfigDict(config.to_dict())
  tuned = sft.enabled(c)
  c.data.source, c.data.path, c.data.instruct_layout = 'instruct', path, layout
  if val_fraction is not None:
    c.data.val_fraction = float(val_fraction)
  elif not tuned:   # the export's fraction is of its pretraining corpus: the schema default
    c.data.val_fraction = float(schema.base_config().data.val_fraction)
  if data_dir:
    c.data.data_dir = data_dir
  if template:
    c.sft.template, c.sft.markers = template, chat.get_template(template).to_json()
  elif not tuned:
    raise chat.ChatDataError('this export was not instruction-tuned: name a template')
  c.train.batch_size = int(batch_size)
  return c


def response_bits_per_byte(exported, path: str, **kwargs) -> dict:
  """{bits_per_byte, loss, targets, bytes, items} over the held-out items' responses."""
  config = response_config(exported.config, path, **kwargs)
  featurizer = sft.maybe_wrap(config, exported.featurizer, loss_on='response')
  eval_fn = jax.jit(lambda params, batch: objective.loss_sums(exported.model, params, batch))
  totals = None
  for batch in pipeline.make_eval_iter(config, featurizer, 'validation'):
    sums = jax.device_get(eval_fn(exported.params, batch))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  items = len(pipeline.document_dataset(config, 'validation'))
  return dict(bits_per_byte=float(totals['nll'] / math.log(2) / max(totals['bytes'], 1.0)),
              loss=float(totals['nll'] / max(totals['units'], 1.0)),
              targets=float(totals['targets']), bytes=float(totals['bytes']), items=items,
              file=path, val_fraction=float(config.data.val_fraction),
              template=chat.template_of(config).name)
