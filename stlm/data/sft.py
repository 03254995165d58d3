"""Instruction-tuning examples: a conversation record -> the kind's examples, response-masked.

`SftFeaturizer` wraps a kind's featurizer (its `conversation(pieces)` builds the windows):
the record (a conversation as JSON, stlm/data/chat.py) is rendered by the template into
prompt and response pieces, and with `loss_on='response'` only response targets carry
loss_mask 1. Everything else (packing layout, `pair` for benchmarks) is the kind's own, so
packed rows keep one segment id per example and no conversation attends to another.
"""

from __future__ import annotations

from stlm.data import chat

LOSS_ON = ('response', 'all')


class SftFeaturizer:
  """A kind's featurizer whose documents are conversation records."""

  def __init__(self, base, template: chat.Template, loss_on: str = 'response'):
    if loss_on not in LOSS_ON:
      raise ValueError(f'sft.loss_on={loss_on!r}: choose one of {", ".join(LOSS_ON)}')
    self.base, self.template, self.loss_on = base, template, loss_on

  def pieces(self, turns: list[dict]) -> list[tuple[str, bool]]:
    pieces = self.template.render(turns)
    if self.loss_on == 'all':
      return [(text, True) for text, _ in pieces]
    return pieces

  def document(self, text: str):
    return self.base.conversation(self.pieces(chat.decode_record(text)))

  def __getattr__(self, name):
    # Only reached for attributes this class lacks: the kind's layout hooks (length_struct,
    # to_batch_row, ...) and scoring (pair) stay the base featurizer's.
    if name == 'base':
      raise AttributeError(name)
    return getattr(self.base, name)


def enabled(config) -> bool:
  return bool(config.get('sft') and config.sft.get('template'))


def maybe_wrap(config, featurizer, loss_on: str | None = None):
  """The SFT featurizer of an instruction-tuning config (`sft.template` set), else
  `featurizer` itself. `loss_on` overrides the config's (validation always scores the
  response only)."""
  if not enabled(config):
    return featurizer
  return SftFeaturizer(featurizer, chat.template_of(config), loss_on or config.sft.loss_on)
