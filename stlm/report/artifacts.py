"""The artifact-size view: every export under a runs folder, its size on disk and as a
.tar.xz (stlm.compress.artifact), and its held-out bits per byte where it was scored.

An export is any directory holding config.json and params/ (a training run's export, or one
written by stlm.compress). Its bits per byte come from the results.json beside it that
`python -m stlm.eval --text=...` wrote for it (its `checkpoint` names this export); an
export never scored on text shows '-' and stays out of the plot.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from stlm.compress import artifact
from stlm.export import codec

HEADER = ('Export', 'Compression', 'Held-out bits/byte', 'MB on disk', 'MB .tar.xz')


@dataclasses.dataclass
class Artifact:
  name: str                    # path relative to the scanned root
  label: str                   # what stlm.compress did ('as trained' for other exports)
  model: str                   # the config's name and kind, for grouping in the plot
  bytes: int
  xz_bytes: int
  bits_per_byte: float | None


def _json(path: pathlib.Path):
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except (OSError, ValueError):
    return None


def _bits_per_byte(export_dir: pathlib.Path) -> float | None:
  results = _json(export_dir.parent / 'results.json') or {}
  checkpoint = results.get('checkpoint')
  # The last two parts, so that a runs folder that was moved still matches.
  if checkpoint and pathlib.Path(checkpoint).parts[-2:] != export_dir.parts[-2:]:
    return None
  return ((results.get('perplexity') or {}).get('bits_per_byte'))


def _exports(root: pathlib.Path) -> list[pathlib.Path]:
  found = []
  for config in sorted(root.rglob('config.json')):
    d = config.parent
    rel = d.relative_to(root).parts
    if (d / 'params').is_dir() and not any(p.startswith('.') or p.endswith(('.writing', '.old'))
                                           for p in rel):
      found.append(d)
  return found


def scan(root) -> list[Artifact]:
  """Every export under `root`, sorted by path (sizes measured where no record is current)."""
  root = pathlib.Path(root)
  out = []
  for d in _exports(root):
    manifest = _json(d / codec.MANIFEST) or {}
    config = _json(d / 'config.json') or {}
    size = artifact.sizes(str(d))
    out.append(Artifact(
        name=d.relative_to(root).as_posix() or d.name, label=manifest.get('label', 'as trained'),
        model=f"{config.get('name', '?')} ({(config.get('model') or {}).get('kind', '?')})",
        bytes=size['bytes'], xz_bytes=size['xz_bytes'], bits_per_byte=_bits_per_byte(d)))
  return out


def rows(artifacts: list[Artifact]) -> list[list[str]]:
  return [[a.name, a.label, '-' if a.bits_per_byte is None else f'{a.bits_per_byte:.3f}',
           f'{a.bytes / 1e6:.3f}', f'{a.xz_bytes / 1e6:.3f}'] for a in artifacts]


def markdown(artifacts: list[Artifact]) -> str:
  lines = ['| ' + ' | '.join(HEADER) + ' |', '|' + '---|' * len(HEADER)]
  lines += ['| ' + ' | '.join(c.replace('|', '\\|') for c in r) + ' |' for r in rows(artifacts)]
  return '\n'.join(lines)
