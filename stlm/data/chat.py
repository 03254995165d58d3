"""Conversations and prompt templates of instruction tuning (see docs/sft.md).

A conversation is a list of turns `{'role': ..., 'content': ...}`. Two item layouts are read:
  alpaca  {'instruction', 'input' (may be empty), 'output'} -> user [, input], assistant;
  chat    {'messages': [turns]} or a bare list of turns (roles system | user | assistant).

A `Template` renders a conversation as text pieces, each flagged whether it is response
text (the only text the loss sees under `sft.loss_on='response'`). A turn is its role's
prefix then its content; turns are joined by `sep`. An assistant turn is
`prefix` (prompt) + `content + end` (response): the end-of-response marker is response text,
so the model learns to write it, and generation stops when it appears. `parse` is the
inverse of `render` for contents that hold no marker.

`config.sft.template` names one of TEMPLATES; the trainer records the template itself in
`config.sft.markers` (JSON), so an export carries the exact markers it was tuned with.
"""

from __future__ import annotations

import dataclasses
import json
import re

from stlm import cli_errors

RESPONSE_ROLE = 'assistant'
LAYOUTS = ('auto', 'alpaca', 'chat')


class ChatDataError(cli_errors.BadInput, ValueError):
  """An instruction item or a conversation that cannot be read or rendered."""


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  prefixes: dict            # role -> text before its content
  end: str                  # closes every response (end-of-response marker)
  sep: str                  # between turns

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> 'Template':
    d = json.loads(text)
    return cls(name=d['name'], prefixes=dict(d['prefixes']), end=d['end'], sep=d['sep'])

  def render(self, turns: list[dict]) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of a conversation, in order; joined they are the text."""
    pieces = []
    for i, turn in enumerate(turns):
      role, content = turn['role'], turn['content']
      if role not in self.prefixes:
        raise ChatDataError(f'template {self.name!r} has no role {role!r} (roles: '
                            f'{", ".join(self.prefixes)})')
      lead = (self.sep if i else '') + self.prefixes[role]
      if role == RESPONSE_ROLE:
        pieces += [(lead, False), (content + self.end, True)]
      else:
        pieces.append((lead + content, False))
    return [(t, r) for t, r in _merge(pieces) if t]

  def text(self, turns: list[dict]) -> str:
    return ''.join(t for t, _ in self.render(turns))

  def prompt(self, turns: list[dict]) -> str:
    """The text before the next response: the turns so far, then the assistant prefix."""
    lead = self.sep if turns else ''
    return self.text(turns) + lead + self.prefixes[RESPONSE_ROLE]

  def parse(self, text: str) -> list[dict]:
    """The turns of a rendered conversation (ChatDataError if it does not follow the
    template)."""
    by_prefix = sorted(self.prefixes.items(), key=lambda kv: -len(kv[1]))
    starts = '|'.join(re.escape(self.sep + p) for _, p in by_prefix)
    turns, pos = [], 0
    while pos < len(text):
      if turns:
        if not text.startswith(self.sep, pos):
          raise ChatDataError(f'expected {self.sep!r} at offset {pos}')
        pos += len(self.sep)
      role = next((r for r, p in by_prefix if text.startswith(p, pos)), None)
      if role is None:
        raise ChatDataError(f'no role prefix of template {self.name!r} at offset {pos}')
      pos += len(self.prefixes[role])
      if role == RESPONSE_ROLE:
        stop = text.find(self.end, pos)
        if stop < 0:
          raise ChatDataError(f'a response without its end marker {self.end!r}')
        turns.append({'role': role, 'content': text[pos:stop]})
        pos = stop + len(self.end)
      else:
        m = re.compile(starts).search(text, pos)
        stop = m.start() if m else len(text)
        turns.append({'role': role, 'content': text[pos:stop]})
        pos = stop
    return turns


def _merge(pieces):
  """Neighbouring pieces of the same flag as one (so each is encoded once)."""
  out = []
  for text, flag in pieces:
    if out and out[-1][1] == flag:
      out[-1] = (out[-1][0] + text, flag)
    else:
      out.append((text, flag))
  return out


TEMPLATES = {
    # Alpaca's section headers, with an explicit end-of-response line.
    'alpaca': Template(name='alpaca', prefixes={'system': '### System:\n',
                                                'user': '### Instruction:\n',
                                                'input': '### Input:\n',
                                                'assistant': '### Response:\n'},
                       end='\n### End', sep='\n\n'),
    # Role tags on their own line, as chat models' templates write them.
    'chat': Template(name='chat', prefixes={'system': '<|system|>\n', 'user': '<|user|>\n',
                                            'input': '<|input|>\n',
                                            'assistant': '<|assistant|>\n'},
                     end='<|end|>', sep='\n'),
}


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise ChatDataError(f'unknown template {name!r}; choose one of {", ".join(TEMPLATES)}')
  return TEMPLATES[name]


def template_of(config) -> Template:
  """The template an SFT config (or export) was tuned with: the recorded markers when
  present, else the named template."""
  s = config.get('sft')
  if s is None or not s.get('template'):
    raise ChatDataError('the config has no sft.template (not an instruction-tuned run)')
  if s.get('markers'):
    return Template.from_json(s.markers)
  return get_template(s.template)


def turns_of(item, layout: str = 'auto') -> list[dict]:
  """The conversation of one instruction item (alpaca or chat layout)."""
  if layout not in LAYOUTS:
    raise ChatDataError(f'unknown layout {layout!r}; choose one of {", ".join(LAYOUTS)}')
  if layout == 'auto':
    layout = 'alpaca' if isinstance(item, dict) and 'instruction' in item else 'chat'
  if layout == 'alpaca':
    if not isinstance(item, dict) or 'instruction' not in item or 'output' not in item:
      raise ChatDataError('an alpaca item needs "instruction" and "output"')
    turns = [{'role': 'user', 'content': str(item['instruction'])}]
    if str(item.get('input') or '').strip():
      turns.append({'role': 'input', 'content': str(item['input'])})
    return turns + [{'role': RESPONSE_ROLE, 'content': str(item['output'])}]
  messages = item.get('messages') if isinstance(item, dict) else item
  if not isinstance(messages, list) or not messages:
    raise ChatDataError('a chat item needs "messages": a list of {role, content} turns')
  turns = []
  for m in messages:
    if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
      raise ChatDataError(f'a chat turn needs "role" and "content", got {m!r:.80}')
    turns.append({'role': str(m['role']), 'content': str(m['content'])})
  if not any(t['role'] == RESPONSE_ROLE for t in turns):
    raise ChatDataError(f'a conversation without an {RESPONSE_ROLE!r} turn has nothing to '
                        'learn')
  return turns


def read_items(path: str) -> list:
  """Items of a .json file (a list) or a .jsonl file (one item a line)."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  if path.endswith('.jsonl'):
    try:
      return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
      raise ChatDataError(f'{path}: not JSON lines ({e})') from None
  try:
    items = json.loads(text)
  except ValueError as e:
    raise ChatDataError(f'{path}: not JSON ({e})') from None
  if not isinstance(items, list):
    raise ChatDataError(f'{path}: expected a JSON list of items')
  return items


def read_conversations(path: str, layout: str = 'auto') -> list[list[dict]]:
  return [turns_of(item, layout) for item in read_items(path)]


def encode_record(turns: list[dict]) -> str:
  """A conversation as a data record's text (what the instruction builder stores)."""
  return json.dumps(turns, ensure_ascii=False, sort_keys=True)


def decode_record(text: str) -> list[dict]:
  return json.loads(text)
