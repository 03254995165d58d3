"""What the tiny-encoder study reports: slopes of its gaps, the three findings, the table
and the three plots, all from the per-arm gap rows (stlm.experiments.encoder_design)."""

from __future__ import annotations

import math
import pathlib

from stlm.experiments import encoder_design
from stlm.experiments import encoder_stats


def _series(d, rows: list[dict], task: str, n: int, on_axis) -> list[dict]:
  return [r for r in rows if r['task'] == task and r['rows'] == n and on_axis(d, r)]


def _slope(rows: list[dict], x_of) -> dict:
  xs = [x_of(r) for r in rows for _ in r['per_seed']]
  ys = [g for r in rows for g in r['per_seed']]
  return encoder_stats.ols_slope(xs, ys)


def slopes(d: encoder_design.Design, rows: list[dict]) -> dict:
  """Per-seed gaps regressed on log10 pretraining bytes (size axis, task_rows) and on the
  word-occurrence overlap (overlap axis); AG News also on log10 fine-tuning rows."""
  out = {}
  for task in d.tasks:
    n = 0 if task == 'fewrel' else d.task_rows
    size = _series(d, rows, task, n, encoder_design.on_size_axis)
    ovl = _series(d, rows, task, n, encoder_design.on_overlap_axis)
    if len({r['bytes'] for r in size}) >= 2:
      out[(task, 'log10_bytes')] = _slope(size, lambda r: math.log10(r['bytes']))
    if len({r['corpus'] for r in ovl}) >= 2:
      out[(task, 'word_overlap')] = _slope(ovl, lambda r: r['overlap_word_occurrences'])
  ft = [r for r in rows if r['task'] == 'agnews' and encoder_design.on_size_axis(d, r) and
        r['budget'] == max(d.wiki_bytes)]
  if len({r['rows'] for r in ft}) >= 2:
    out[('agnews', 'log10_rows')] = _slope(ft, lambda r: math.log10(r['rows']))
  return out


def findings(d: encoder_design.Design, rows: list[dict], fits: dict,
             comm: dict | None) -> list[str]:
  v = encoder_stats.verdict
  top = max(d.wiki_bytes)
  gaps = [f'{r["task"]}: ' + v(r['gap'], r['seed_se'], 'gap (seed SE)') for r in rows
          if encoder_design.on_size_axis(d, r) and r['budget'] == top and
          r['rows'] == (0 if r['task'] == 'fewrel' else d.task_rows)]
  out = [f'1. Pretrained beats scratch (Wikipedia {top:,} bytes, {d.seeds} seeds): ' +
         '; '.join(gaps) + '.']
  growth = []
  for (task, x), s in sorted(fits.items()):
    if x in ('log10_bytes', 'word_overlap'):
      growth.append(f'{task} vs {x}: ' + v(s['slope'], s['se'], 'slope'))
  out.append('2. The gap grows with pretraining size and with overlap: ' +
             ('; '.join(growth) if growth else 'not decidable: fewer than two sizes or corpora')
             + '.')
  if comm is None:
    out.append('3. Committees: not run (--committee_size=0).')
  else:
    dv, cv = comm['deep_vs_member0'], comm['committee_vs_deep']
    k = comm['curve'][-1]['members']
    if dv['gap'] < encoder_stats.Z_DECIDES * dv['se']:
      out.append(f'3. A committee of {k} BERT-1 matches one BERT-6: not decidable at this '
                 f'scale: BERT-6 does not beat one BERT-1 first (BERT-6 - BERT-1 = '
                 f'{dv["gap"]:+.4f} ± {dv["se"]:.4f} paired item SE).')
    elif cv['gap'] <= -encoder_stats.Z_DECIDES * cv['se']:
      out.append(f'3. A committee of {k} BERT-1 matches one BERT-6: not reproduced: '
                 f'committee - BERT-6 = {cv["gap"]:+.4f} ± {cv["se"]:.4f} (paired item SE), '
                 f'after BERT-6 beat BERT-1 by {dv["gap"]:+.4f} ± {dv["se"]:.4f}.')
    else:
      out.append(f'3. A committee of {k} BERT-1 matches one BERT-6: reproduced: committee - '
                 f'BERT-6 = {cv["gap"]:+.4f} ± {cv["se"]:.4f} (paired item SE), after BERT-6 '
                 f'beat BERT-1 by {dv["gap"]:+.4f} ± {dv["se"]:.4f}.')
  return out


def table(d: encoder_design.Design, rows: list[dict], fits: dict, comm: dict | None, found) -> str:
  lines = ['## Findings', ''] + found + [
      '', '## Pretrained minus scratch, per arm', '',
      f'Mean over {d.seeds} seeds (seed s vs seed s); seed SE = spread of the per-seed gaps; '
      'item SE = paired over the test items. Overlap: fraction of the task\'s token / word '
      'occurrences whose type occurs in the pretraining subset.', '',
      '| task | corpus | bytes | docs | fine-tune rows | pretrained | scratch | gap | seed SE | '
      'item SE | per-seed gaps | token overlap | word overlap | n_test |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f'| {r["task"]} | {r["corpus"]} | {r["bytes"]:,} | {r["documents"]:,} | '
        f'{r["rows"] or "-"} | {r["pretrained"]:.4f} | {r["scratch"]:.4f} | '
        f'{r["gap"]:+.4f} | {r["seed_se"]:.4f} | {r["item_se"]:.4f} | '
        f'{", ".join(f"{g:+.3f}" for g in r["per_seed"])} | '
        f'{r["overlap_token_occurrences"]:.3f} | {r["overlap_word_occurrences"]:.3f} | '
        f'{r["n_test"]} |')
  lines += ['', '## Slopes of the per-seed gap', '', '| task | against | slope | SE | points |',
            '|---|---|---|---|---|']
  for (task, x), s in sorted(fits.items()):
    lines.append(f'| {task} | {x} | {s["slope"]:+.4f} | {s["se"]:.4f} | {s["points"]} |')
  if comm:
    lines += ['', f'## Committees ({comm["task"]}, {comm["rows"]} rows; BERT-1 seeds on '
              f'{comm["corpus"]} {comm["bytes"]:,} bytes)', '',
              '| model | accuracy | latency ms/example |', '|---|---|---|']
    for c in comm['curve']:
      lines.append(f'| committee of {c["members"]} BERT-1 | {c["accuracy"]:.4f} ± '
                   f'{c["stderr"]:.4f} | {c["latency_s_per_example"] * 1e3:.3f} |')
    b = comm['deep']
    lines.append(f'| one BERT-6 ({b["steps"]} steps) | {b["accuracy"]:.4f} ± {b["stderr"]:.4f} '
                 f'| {b["latency_s_per_example"] * 1e3:.3f} |')
    lines += ['', 'Masked-LM validation loss during pretraining (convergence):', '',
              '| model | ' + ' | '.join(f'step {p["step"]}' for p in b['validation']) + ' |',
              '|---|' + '---|' * len(b['validation']),
              '| BERT-6 | ' + ' | '.join(f'{p["loss"]:.3f}' for p in b['validation']) + ' |',
              '', '| model | ' + ' | '.join(f'step {p["step"]}' for p in
                                            comm['shallow_validation']) + ' |',
              '|---|' + '---|' * len(comm['shallow_validation']),
              '| BERT-1 seed 0 | ' + ' | '.join(f'{p["loss"]:.3f}' for p in
                                                 comm['shallow_validation']) + ' |']
  return '\n'.join(lines) + '\n'


def plots(d: encoder_design.Design, rows: list[dict], comm: dict | None, out: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  def errorbar_plot(series, xlabel, fname, logx):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, rs, x_of in series:
      rs = sorted(rs, key=x_of)
      ax.errorbar([x_of(r) for r in rs], [r['gap'] for r in rs],
                  yerr=[r['seed_se'] for r in rs], marker='o', capsize=3, label=label)
    ax.axhline(0, color='grey', lw=0.8)
    if logx:
      ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel('accuracy gap, pretrained - scratch (± seed SE)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / fname, dpi=120)
    plt.close(fig)

  size_series = []
  for task in d.tasks:
    for n in ((0,) if task == 'fewrel' else
              d.finetune_rows if task == 'agnews' else (d.task_rows,)):
      rs = _series(d, rows, task, n, encoder_design.on_size_axis)
      size_series.append((f'{task}' + (f', {n} rows' if n else ''), rs,
                          lambda r: r['bytes']))
  errorbar_plot(size_series, 'pretraining subset (bytes of Wikipedia)', 'gap_vs_size.png', True)
  ovl_series = []
  for task in d.tasks:
    n = 0 if task == 'fewrel' else d.task_rows
    rs = _series(d, rows, task, n, encoder_design.on_overlap_axis)
    ovl_series.append((task, rs, lambda r: r['overlap_word_occurrences']))
  errorbar_plot(ovl_series, f'word overlap with the pretraining corpus ({d.overlap_bytes:,} '
                'bytes each)', 'gap_vs_overlap.png', False)
  if comm:
    fig, ax1 = plt.subplots(figsize=(5.5, 3.8))
    ks = [c['members'] for c in comm['curve']]   # one layer each: layers run per example
    ax1.errorbar(ks, [c['accuracy'] for c in comm['curve']],
                 yerr=[c['stderr'] for c in comm['curve']], marker='o', capsize=3,
                 label='committee of K BERT-1')
    ax1.errorbar([6], [comm['deep']['accuracy']], yerr=[comm['deep']['stderr']], marker='s',
                 capsize=3, color='C1', ls='none', label='one BERT-6')
    ax1.set_xlabel('layers run per example (K members x 1 layer, or 6)')
    ax1.set_ylabel('accuracy')
    ax2 = ax1.twinx()
    ax2.plot(ks, [c['latency_s_per_example'] * 1e3 for c in comm['curve']], 'o:', color='C2',
             label='committee latency')
    ax2.plot([6], [comm['deep']['latency_s_per_example'] * 1e3], 's', color='C3',
             label='BERT-6 latency')
    ax2.set_ylabel('ms per example')
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    # Below the axes: inside them it hides whichever marker sits in its corner.
    ax1.legend(h1 + h2, l1 + l2, fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.16),
               ncol=2)
    fig.tight_layout()
    fig.savefig(out / 'committee.png', dpi=120, bbox_inches='tight')
    plt.close(fig)
