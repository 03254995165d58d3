"""The byte-pool comparison's table and plot: one line per (comparison, row), seeds pooled.

A result is the dict stlm/experiments/equal_core.py writes per trained run (row, seed,
comparison, params, FLOPs, throughput, held-out bits/byte in and out of domain, diagnostics).
Cells give the mean over seeds; bits/byte cells add '± half the range' when there are two or
more seeds, the spread a reader needs to tell a difference from seed noise.
"""

from __future__ import annotations

import statistics

# Diagnostics columns: header -> the cell of a run's diagnostics dict (None: not computed).
DIAGNOSTIC_COLUMNS = {
    'mean-y cost': lambda d: d['mean_y_cost'],
    'shuffled-y cost': lambda d: d['shuffled_y_cost'],
    'first bits': lambda d: d['slot_bits_per_byte']['first'],
    'later bits': lambda d: d['slot_bits_per_byte']['later'],
    'EOC bits': lambda d: d['slot_bits_per_byte']['end_of_chunk'],
    'grad enc:dec': lambda d: d['grad_ratio'],
}
_FORMATS = {'mean-y cost': '{:+.4f}', 'shuffled-y cost': '{:+.4f}', 'grad enc:dec': '{:.3g}'}
DIAGNOSTICS_LEGEND = (
    'mean-y / shuffled-y cost: held-out bits/byte added with the core outputs replaced by '
    'their batch mean / by another document\'s (OOD: the same on the out-of-domain documents); '
    'first / later / EOC bits: the bits/byte of the first symbol of each chunk, the later '
    'bytes and END_OF_CHUNK (they add up to the bits/byte); grad enc:dec: gradient-norm ratio '
    'byte encoder : byte decoder; \'-\': no core-output hook (baseline, bytes, local_only) or '
    'not computed.')


def _mean(values):
  values = [v for v in values if v is not None]
  return statistics.fmean(values) if values else None


def spread_cell(values, fmt: str = '{:.4f}') -> str:
  """'mean' or 'mean ± half range' of the non-missing values; '-' when there are none."""
  values = [v for v in values if v is not None]
  if not values:
    return '-'
  text = fmt.format(statistics.fmean(values))
  if len(values) > 1:
    text += ' ± ' + '{:.4f}'.format((max(values) - min(values)) / 2)
  return text


def group(results: list[dict]) -> list[list[dict]]:
  """Runs grouped by (comparison, row), in first-seen order."""
  groups: dict[tuple, list[dict]] = {}
  for r in results:
    groups.setdefault((r.get('comparison', 'core'), r['row']), []).append(r)
  return list(groups.values())


def _diag(runs, key, column):
  get = DIAGNOSTIC_COLUMNS[column]
  return [get(r[key]) if r.get(key) else None for r in runs]


def table(results: list[dict], diagnostics: bool = True) -> str:
  """Markdown table of `results`; 'vs baseline' is the bits/byte ratio to the baseline row of
  the same comparison (mean over seeds)."""
  groups = group(results)
  base = {g[0].get('comparison', 'core'): _mean([r['bits_per_byte'] for r in g])
          for g in groups if g[0]['row'] == 'baseline'}
  extra = list(DIAGNOSTIC_COLUMNS) if diagnostics else []
  has_ood = any(r.get('ood_bits_per_byte') is not None for r in results)
  header = ['comparison', 'row', 'seeds', 'params', 'byte enc+dec / embed+head',
            'train GFLOPs/target', 'train PFLOPs', 'train targets/s', 'text bytes/s',
            'held-out bits/byte', 'vs baseline']
  if has_ood:
    header += ['OOD bits/byte', 'OOD mean-y cost']
  header += extra
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for runs in groups:
    first = runs[0]
    comparison = first.get('comparison', 'core')
    bpb = _mean([r['bits_per_byte'] for r in runs])
    ratio = f'{bpb / base[comparison]:.3f}x' if base.get(comparison) else '-'
    rate = _mean([r['targets_per_s'] for r in runs])
    text_rate = _mean([r['targets_per_s'] * r['bytes_per_target'] for r in runs
                       if r.get('bytes_per_target')])
    flops = _mean([r.get('train_flops') for r in runs])
    cells = [comparison, first['row'], ','.join(str(r.get('seed', 0)) for r in runs),
             f"{first['params'] / 1e6:.2f}M", f"{first['embed_head'] / 1e6:.3f}M",
             f"{first['flops_per_target'] / 1e9:.4f}",
             f'{flops / 1e15:.3f}' if flops else '-', f'{rate:.0f}',
             f'{text_rate:.0f}' if text_rate else '-',
             spread_cell([r['bits_per_byte'] for r in runs]), ratio]
    if has_ood:
      cells += [spread_cell([r.get('ood_bits_per_byte') for r in runs]),
                spread_cell(_diag(runs, 'ood_diagnostics', 'mean-y cost'), '{:+.4f}')]
    for column in extra:
      cells.append(spread_cell(_diag(runs, 'diagnostics', column),
                               _FORMATS.get(column, '{:.4f}')))
    lines.append('| ' + ' | '.join(cells) + ' |')
  if extra:
    lines += ['', DIAGNOSTICS_LEGEND]
  return '\n'.join(lines)


def plot(results: list[dict], path: str) -> None:
  """Held-out bits/byte against training FLOPs, one marker per run, one colour per row."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  markers = {'core': 'o', 'params': 's', 'flops': '^'}
  colours = {}
  for r in results:
    if not r.get('train_flops'):
      continue
    colour = colours.setdefault(r['row'], f'C{len(colours) % 10}')
    comparison = r.get('comparison', 'core')
    ax.scatter(r['train_flops'], r['bits_per_byte'], color=colour,
               marker=markers.get(comparison, 'x'))
  for row, colour in colours.items():
    ax.scatter([], [], color=colour, label=row)
  for comparison, marker in markers.items():
    ax.scatter([], [], color='gray', marker=marker, label=f'equal {comparison}')
  ax.set_xscale('log')
  ax.set_xlabel('training FLOPs')
  ax.set_ylabel('held-out bits/byte')
  ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
