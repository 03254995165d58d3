"""PNG plots of a set of runs (matplotlib, Agg backend: no display needed).

Runs with data phases get dotted vertical lines at their phase boundaries on the loss and
validation-vs-tokens plots.
"""

from __future__ import annotations

import math
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from stlm.report.collect import Run
from stlm.report.table import BENCHMARKS


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _empty(ax, text: str) -> None:
  ax.text(0.5, 0.5, text, ha='center', va='center', transform=ax.transAxes, color='gray')


def _finish(fig, ax, path: str, drawn: bool, empty_text: str) -> str:
  """A legend when something was drawn, else `empty_text` across the axes; then saved."""
  if drawn:
    ax.legend(fontsize=8)
  else:
    _empty(ax, empty_text)
  return _save(fig, path)


def _mark_phases(ax, run: Run, line, scale: float = 1.0) -> None:
  """Dotted vertical lines in the run's colour where its next data phase starts."""
  for k, step in enumerate(run.phase_boundaries):
    ax.axvline(step * scale, color=line.get_color(), ls=':', lw=1.0, alpha=0.8,
               label=f'{run.name}: phase boundaries' if k == 0 else None)


def validation_vs_tokens(runs: list[Run], path: str) -> str:
  fig, ax = plt.subplots(figsize=(7, 4.2))
  drawn = False
  for r in runs:
    pts = r.series('validation', 'bits_per_byte')
    if pts and r.tokens_per_step:
      line, = ax.plot([s * r.tokens_per_step for s, _, _ in pts], [v for _, v, _ in pts], 'o-',
                      label=f'{r.name} ({r.status})', ms=3)
      _mark_phases(ax, r, line, r.tokens_per_step)
      drawn = True
  ax.set(xlabel='tokens seen (chunks for byte_pool)', ylabel='validation bits per byte',
         title='Validation bits per byte vs tokens seen')
  ax.grid(alpha=0.3)
  return _finish(fig, ax, path, drawn, 'no validation records yet')


def validation_vs_wall(runs: list[Run], path: str) -> str:
  fig, ax = plt.subplots(figsize=(7, 4.2))
  drawn = False
  for r in runs:
    pts = [(t, v) for _, v, t in r.series('validation', 'bits_per_byte') if t is not None]
    if pts:
      ax.plot([t / 60 for t, _ in pts], [v for _, v in pts], 'o-', label=r.name, ms=3)
      drawn = True
  ax.set(xlabel='wall time since the first record (minutes)', ylabel='validation bits per byte',
         title='Validation bits per byte vs wall time')
  ax.grid(alpha=0.3)
  return _finish(fig, ax, path, drawn, 'no timed validation records (metrics.jsonl without "time")')


def training_loss(runs: list[Run], path: str) -> str:
  fig, ax = plt.subplots(figsize=(7, 4.2))
  drawn = False
  for r in runs:
    pts = r.series('train', 'loss')
    if pts:
      line, = ax.plot([s for s, _, _ in pts], [v for _, v, _ in pts], label=r.name, lw=1.2)
      _mark_phases(ax, r, line)
      drawn = True
  ax.set(xlabel='step', ylabel='training loss (nats per predicted unit)',
         title='Training loss')
  ax.grid(alpha=0.3)
  return _finish(fig, ax, path, drawn, 'no training records yet')


def benchmark_bars(runs: list[Run], path: str) -> str:
  """Accuracy per benchmark and run, error bars = 1 standard error, chance as a dashed line."""
  fig, ax = plt.subplots(figsize=(8, 4.2))
  with_results = [r for r in runs if (r.results or {}).get('benchmarks')]
  width = 0.8 / max(len(with_results), 1)
  for j, r in enumerate(with_results):
    bench = r.results['benchmarks']
    xs, ys, es = [], [], []
    for i, (key, _) in enumerate(BENCHMARKS):
      e = bench.get(key)
      if e:
        main = e.get('main', 'acc')
        se = e.get(f'{main}_stderr')
        xs.append(i - 0.4 + width * (j + 0.5))
        ys.append(100 * e[main])
        es.append(0.0 if se is None or math.isnan(se) else 100 * se)
    ax.bar(xs, ys, width, yerr=es, capsize=3, label=r.name)
  labelled = False
  for i, (key, _) in enumerate(BENCHMARKS):
    chances = [r.results['benchmarks'][key]['chance'] for r in with_results
               if key in r.results['benchmarks']]
    if chances and not math.isnan(chances[0]):
      ax.hlines(100 * chances[0], i - 0.45, i + 0.45, colors='k', linestyles='dashed',
                label=None if labelled else 'chance')
      labelled = True
  ax.set_xticks(range(len(BENCHMARKS)), [c for _, c in BENCHMARKS])
  ax.set(ylabel='accuracy (%)', title='Zero-shot accuracy (± 1 standard error; dashed: chance)',
         ylim=(0, 100))
  ax.grid(alpha=0.3, axis='y')
  if with_results:
    ax.legend(fontsize=8)
  else:
    _empty(ax, 'no benchmark results yet')
  return _save(fig, path)


def learning_curves(run: Run) -> dict[str, list[tuple[int, float, float]]]:
  """{benchmark: [(tokens seen, accuracy, its standard error)]} of the run's in-training
  benchmark rows (metrics.jsonl split 'benchmarks', stlm/train/benchmarks.py)."""
  out: dict[str, list[tuple[int, float, float]]] = {}
  per_step = run.tokens_per_step or 0
  for r in run.metrics:
    if r.get('split') != 'benchmarks':
      continue
    for key, value in r.items():
      if key.count('/') == 1 and key.endswith('/acc') and value is not None:
        se = r.get(f'{key}_stderr')
        out.setdefault(key.split('/')[0], []).append(
            (int(r['step']) * per_step, float(value), float('nan') if se is None else float(se)))
  return out


def benchmark_learning_curves(runs: list[Run], path: str) -> str:
  """Accuracy ± 1 standard error against tokens seen, per run and benchmark."""
  fig, ax = plt.subplots(figsize=(7, 4.2))
  drawn = False
  for r in runs:
    for name, pts in learning_curves(r).items():
      ax.errorbar([t for t, _, _ in pts], [100 * a for _, a, _ in pts],
                  yerr=[0.0 if math.isnan(e) else 100 * e for _, _, e in pts], fmt='o-', ms=3,
                  capsize=2, label=f'{r.name}: {name}')
      drawn = True
  ax.set(xlabel='tokens seen (chunks for byte_pool)', ylabel='accuracy (%)',
         title='Benchmarks during training (± 1 standard error)')
  ax.grid(alpha=0.3)
  return _finish(fig, ax, path, drawn, 'no in-training benchmark records (train.eval_benchmarks)')


def artifact_sizes(artifacts, path: str) -> str:
  """Held-out bits per byte against megabytes: each export on disk (filled) and as .tar.xz
  (hollow, joined to it by a line), one colour per model, each point named by its setting."""
  fig, ax = plt.subplots(figsize=(8, 4.8))
  scored = [a for a in artifacts if a.bits_per_byte is not None]
  colours = {m: f'C{i}' for i, m in enumerate(sorted({a.model for a in scored}))}
  for a in scored:
    c = colours[a.model]
    x_disk, x_xz = a.bytes / 1e6, a.xz_bytes / 1e6
    ax.plot([x_disk, x_xz], [a.bits_per_byte] * 2, '-', color=c, lw=0.8, alpha=0.5)
    ax.plot(x_disk, a.bits_per_byte, 'o', color=c, ms=5)
    ax.plot(x_xz, a.bits_per_byte, 'o', mfc='none', color=c, ms=6)
    ax.annotate(a.label, (x_disk, a.bits_per_byte), fontsize=6, xytext=(3, 3),
                textcoords='offset points')
  for m, c in colours.items():
    ax.plot([], [], 'o', color=c, label=m)
  if scored:
    ax.plot([], [], 'o', color='gray', label='on disk')
    ax.plot([], [], 'o', mfc='none', color='gray', label='.tar.xz (lzma)')
    ax.set_xscale('log')
    ax.legend(fontsize=7)
  else:
    _empty(ax, 'no export scored on held-out text (python -m stlm.eval --text=...)')
  ax.set(xlabel='size (MB, log scale)', ylabel='held-out bits per byte',
         title='Bits per byte vs size of the export')
  ax.grid(alpha=0.3, which='both')
  return _save(fig, path)


ARTIFACT_PLOT = 'artifact_size.png'

PLOTS = (('val_bpb_tokens.png', validation_vs_tokens), ('val_bpb_wall.png', validation_vs_wall),
         ('train_loss.png', training_loss), ('benchmarks.png', benchmark_bars),
         ('benchmark_curves.png', benchmark_learning_curves))


def write_all(runs: list[Run], out_dir: str, artifacts=None) -> list[str]:
  """Every plot as a PNG in out_dir (the artifact-size plot when `artifacts` is given);
  returns the file names."""
  names = []
  for name, fn in PLOTS:
    fn(runs, os.path.join(out_dir, name))
    names.append(name)
  if artifacts:
    artifact_sizes(artifacts, os.path.join(out_dir, ARTIFACT_PLOT))
    names.append(ARTIFACT_PLOT)
  return names
