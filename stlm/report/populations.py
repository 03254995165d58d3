"""Populations in a report: each as mean ± spread with every member, and paired comparisons.

A population (stlm/train/population_loop.py) writes its members as runs under
`<population>/members/<name>/` beside `population.json`; the scan finds them as runs. Each
population is summarised by its members' final validation bits per byte: mean, standard
deviation and standard error of the mean. Two populations that share seeds are compared
seed by seed (the same seed: the same initialisation and data order), which removes the
seed-to-seed variance the unpaired comparison carries: the mean paired difference with
its standard error.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from stlm.report.collect import Run

MEMBERS_DIR = 'members'                  # as stlm/train/population.py writes them
POPULATION_FILE = 'population.json'


@dataclasses.dataclass
class Population:
  name: str                         # the population's directory, relative to the scanned root
  members: list[Run]

  def values(self) -> dict[int, float]:
    """{seed: final validation bits per byte} of the members that have one."""
    out = {}
    for r in self.members:
      v = (r.final_validation or {}).get('bits_per_byte')
      if v is not None:
        out[int(r.config.get('seed', -1))] = float(v)
    return out


def find(runs: list[Run]) -> list[Population]:
  groups: dict[str, list[Run]] = {}
  for r in runs:
    parent = r.path.parent
    if parent.name == MEMBERS_DIR and (parent.parent / POPULATION_FILE).is_file():
      groups.setdefault(r.name.rsplit('/', 2)[0], []).append(r)
  return [Population(name, members) for name, members in sorted(groups.items())]


def spread(values) -> tuple[float, float, float]:
  """(mean, sample standard deviation, standard error of the mean); nan where undefined."""
  v = np.asarray(list(values), float)
  if v.size == 0:
    return (math.nan,) * 3
  sd = float(v.std(ddof=1)) if v.size > 1 else math.nan
  return float(v.mean()), sd, sd / math.sqrt(v.size) if v.size > 1 else math.nan


def paired(a: Population, b: Population) -> dict | None:
  """b - a over their common seeds: mean difference, its standard error, and the unpaired
  standard error of the same difference; None with fewer than two common seeds."""
  va, vb = a.values(), b.values()
  seeds = sorted(va.keys() & vb.keys())
  if len(seeds) < 2:
    return None
  d = [vb[s] - va[s] for s in seeds]
  mean, _, se = spread(d)
  unpaired = math.sqrt(spread([va[s] for s in seeds])[2] ** 2
                       + spread([vb[s] for s in seeds])[2] ** 2)
  return dict(seeds=seeds, mean=mean, se=se, unpaired_se=unpaired)


def _f(x: float) -> str:
  return '-' if math.isnan(x) else f'{x:.4f}'


def markdown(runs: list[Run]) -> str:
  """The populations section ('' when the runs hold none)."""
  pops = find(runs)
  if not pops:
    return ''
  out = ['## Populations', '', 'Final validation bits per byte of every member; mean ± sample '
         'standard deviation (standard error of the mean).', '',
         '| Population | Members | Mean | SD | SE | Members (seed: bits/byte) |',
         '|---|---|---|---|---|---|']
  for p in pops:
    vals = p.values()
    mean, sd, se = spread(vals.values())
    each = ', '.join(f'{s}: {v:.4f}' for s, v in sorted(vals.items()))
    out.append(f'| {p.name} | {len(p.members)} | {_f(mean)} | {_f(sd)} | {_f(se)} | {each} |')
  pairs = [(a, b, paired(a, b)) for i, a in enumerate(pops) for b in pops[i + 1:]]
  pairs = [(a, b, c) for a, b, c in pairs if c]
  if pairs:
    out += ['', 'Paired by seed (B - A over the seeds both have):', '',
            '| A | B | Seeds | Mean difference | SE (paired) | SE (unpaired) |',
            '|---|---|---|---|---|---|']
    out += [f'| {a.name} | {b.name} | {len(c["seeds"])} | {c["mean"]:+.4f} | {_f(c["se"])} | '
            f'{_f(c["unpaired_se"])} |' for a, b, c in pairs]
  return '\n'.join(out)
