"""Data phases (a curriculum): which sources train which steps, from `data.phases`.

`data.phases` is a comma list of phases in training order, each `<sources>:<end step>`:

  'tinystories:150,wiki:300'          steps 1-150 read tinystories, steps 151-300 wiki
  'tinystories*1+wiki*3:300'          one phase: a mix, tinystories 1 part, wiki 3 parts

A phase trains the steps after the previous phase's end up to and including its own end
step; the last phase's end may be left out (`'tinystories:150,wiki'`) and always runs to the
end of training, so if given it must equal `train.steps`. A source is a name of
`data.sources` or of a builder (`stlm.data.tfds_builders.BUILDERS`); `*w` is its weight in
the phase's mix (default 1). Mix weights (of phases and of `data.mix`) are sharpened or
flattened by `data.mix_temperature` T: shares proportional to w ** (1 / T), so T = 1 keeps
the weights, T > 1 moves towards uniform, T < 1 towards the heaviest source.

This module only reads the spec; what a name reads is `tfds_builders.source_config`'s, and
how a phased run is iterated is `pipeline`'s.
"""

from __future__ import annotations

import dataclasses
import re

_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')


class PhaseSpecError(ValueError):
  """`data.phases` cannot be read; the message says which part and why."""


@dataclasses.dataclass(frozen=True)
class Phase:
  index: int
  label: str                               # the spec text of its sources, e.g. 'tinystories'
  end: int | None                          # last step it trains (None: the end of training)
  parts: tuple[tuple[str, float], ...]     # (source name, weight before the temperature)

  @property
  def sources(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.parts)


def _parts(label: str) -> tuple[tuple[str, float], ...]:
  out = []
  for term in label.split('+'):
    name, star, weight = term.strip().partition('*')
    name = name.strip()
    if not _NAME.match(name):
      raise PhaseSpecError(f'{term.strip()!r} is not a source name (letters, digits, _)')
    try:
      w = float(weight) if star else 1.0
    except ValueError:
      raise PhaseSpecError(f'{term.strip()!r}: the weight after * is not a number') from None
    if not w > 0:
      raise PhaseSpecError(f'{term.strip()!r}: a weight must be positive')
    if name in dict(out):
      raise PhaseSpecError(f'{label!r} names {name!r} twice')
    out.append((name, w))
  return tuple(out)


def parse(spec: str) -> list[Phase]:
  """The phases of `spec` ([] for ''); PhaseSpecError for a malformed or non-increasing one."""
  if not isinstance(spec, str):
    raise PhaseSpecError('must be a string such as "tinystories:150,wiki:300"')
  items = [item.strip() for item in spec.split(',')] if spec.strip() else []
  phases, previous = [], 0
  for i, item in enumerate(items):
    label, colon, end_text = item.rpartition(':')
    if not colon:
      label, end_text = item, ''
    label = label.strip()
    if not label:
      raise PhaseSpecError(f'phase {i + 1} {item!r} has no source')
    end = None
    if end_text.strip():
      if not end_text.strip().isdigit():
        raise PhaseSpecError(f'phase {i + 1} {item!r}: the end step after : is not an integer')
      end = int(end_text)
      if end <= previous:
        raise PhaseSpecError(f'phase {i + 1} {item!r} ends at step {end}, not after the '
                             f'previous end {previous}: end steps must increase')
      previous = end
    elif i < len(items) - 1:
      raise PhaseSpecError(f'phase {i + 1} {item!r} needs an end step (only the last one '
                           'may leave it out)')
    phases.append(Phase(index=i, label=label, end=end, parts=_parts(label)))
  return phases


def check_steps(phases: list[Phase], steps: int) -> None:
  """PhaseSpecError unless every phase trains at least one of `steps` steps."""
  if phases and phases[-1].end is not None and phases[-1].end != steps:
    raise PhaseSpecError(f'the last phase ends at step {phases[-1].end}, not at '
                         f'train.steps={steps} (leave its end out to run it to the end)')


def source_names(phases: list[Phase]) -> list[str]:
  """Every source the phases read, once, sorted."""
  return sorted({name for p in phases for name in p.sources})


def phase_at(phases: list[Phase], step: int) -> Phase:
  """The phase that trains `step` (1-based; step 0, before training, is the first phase's)."""
  for p in phases:
    if p.end is None or step <= p.end:
      return p
  return phases[-1]   # past the last end: the last phase runs on


def boundaries(phases: list[Phase]) -> list[int]:
  """The steps after which a new phase starts."""
  return [p.end for p in phases[:-1]]


def tempered(weights: dict[str, float], temperature: float) -> dict[str, float]:
  """Mix weights w -> w ** (1 / T) (unnormalised: grain's mix normalises)."""
  if temperature == 1.0:
    return {k: float(w) for k, w in weights.items()}
  return {k: float(w) ** (1.0 / temperature) for k, w in weights.items()}
