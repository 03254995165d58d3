"""index.html and README.md of a report: table, plots, and per run its diff and docstring."""

from __future__ import annotations

import html
import os

from stlm.report import artifacts as artifacts_lib
from stlm.report import populations
from stlm.report import sft as sft_lib
from stlm.report import table
from stlm.report.collect import Run

_CSS = '''body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 6px}
th{background:#f0f0f0}.crashed{background:#fde2e2}.running{background:#fff6d5}
pre{background:#f7f7f7;padding:8px;white-space:pre-wrap}img{max-width:48%;margin:4px}'''


def _diff_lines(run: Run, reference: Run | None) -> list[str]:
  if reference is None or reference is run:
    return []
  return [f'{k}: {a!r} -> {b!r}' for k, a, b in table.config_diff(run.config, reference.config)]


def _describe(run: Run) -> tuple[str, str]:
  info = run.info
  git = info.get('git') or {}
  commit = git.get('commit')
  where = (f"{commit[:12]}{' (dirty)' if git.get('dirty') else ''}" if commit else 'not a git checkout'
           if info else 'no run.json')
  facts = [f"status: {run.status}", f"config: {info.get('config_file') or '?'}",
           f'commit: {where}', f"started: {info.get('start_time', '?')}",
           f"ended: {info.get('end_time') or '-'}"]
  if info.get('error'):
    facts.append(f"error: {info['error']}")
  return '; '.join(facts), info.get('config_docstring') or '(no docstring recorded)'


_ARTIFACT_NOTE = ('Every export: held-out bits per byte (results.json of stlm.eval --text '
                  'beside it) against its size on disk and as a .tar.xz (lzma).')


def write_html(runs: list[Run], reference: Run | None, plots: list[str], path: str,
               artifacts=None) -> None:
  e = html.escape
  out = ['<!doctype html><html><head><meta charset="utf-8"><title>stlm runs</title>',
         f'<style>{_CSS}</style></head><body>', f'<h1>stlm runs ({len(runs)})</h1>',
         '<p>Accuracy in % ± 1 standard error, with the split each number comes from. '
         f"Reference for config diffs: <b>{e(reference.name) if reference else '-'}</b>.</p>",
         '<table><tr>' + ''.join(f'<th>{e(h)}</th>' for h in table.HEADER) + '</tr>']
  for run, cells in zip(runs, table.rows(runs)):
    out.append(f'<tr class="{e(run.status)}">' + ''.join(f'<td>{e(c)}</td>' for c in cells)
               + '</tr>')
  out.append('</table>')
  section = populations.markdown(runs)
  if section:   # the same tables, as preformatted markdown
    out.append(f'<h2>Populations</h2><pre>{e(section.split(chr(10), 2)[2])}</pre>')
  tuned = sft_lib.rows(runs)
  if tuned:
    out += ['<h2>Instruction tuning and generation</h2>',
            '<table><tr>' + ''.join(f'<th>{e(h)}</th>' for h in sft_lib.HEADER) + '</tr>']
    out += ['<tr>' + ''.join(f'<td>{e(c)}</td>' for c in cells) + '</tr>' for cells in tuned]
    out.append('</table>')
  if artifacts:
    out += ['<h2>Artifact size</h2>', f'<p>{e(_ARTIFACT_NOTE)}</p>',
            '<table><tr>' + ''.join(f'<th>{e(h)}</th>' for h in artifacts_lib.HEADER) + '</tr>']
    out += ['<tr>' + ''.join(f'<td>{e(c)}</td>' for c in cells) + '</tr>'
            for cells in artifacts_lib.rows(artifacts)]
    out.append('</table>')
  out.append('<h2>Plots</h2>')
  out += [f'<img src="{e(p)}" alt="{e(p)}">' for p in plots]
  out.append('<h2>Runs</h2>')
  for run in runs:
    facts, doc = _describe(run)
    diff = _diff_lines(run, reference)
    out += [f'<h3 id="{e(run.name)}">{e(run.name)}</h3>', f'<p>{e(facts)}</p>',
            f'<pre>{e(doc)}</pre>']
    if run is reference:
      out.append('<p>(the reference run)</p>')
    else:
      out.append(f'<p>Config diff vs {e(reference.name) if reference else "-"} '
                 f'({len(diff)} keys):</p><pre>{e(chr(10).join(diff) or "(identical)")}</pre>')
  out.append('</body></html>')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(out))


def write_markdown(runs: list[Run], reference: Run | None, plots: list[str], path: str,
                   artifacts=None) -> None:
  out = [f'# stlm runs ({len(runs)})', '',
         'Accuracy in % ± 1 standard error, with the split each number comes from.', '',
         table.markdown(runs), '']
  section = populations.markdown(runs)
  if section:
    out += [section, '']
  section = sft_lib.markdown(runs)
  if section:
    out += [section, '']
  if artifacts:
    out += ['## Artifact size', '', _ARTIFACT_NOTE, '', artifacts_lib.markdown(artifacts), '']
  out += ['## Plots', '']
  out += [f'![{p}]({p})' for p in plots]
  out += ['', '## Runs']
  for run in runs:
    facts, doc = _describe(run)
    out += ['', f'### {run.name}', '', facts, '', '```', doc, '```']
    if run is reference:
      out += ['', '(the reference run)']
    else:
      diff = _diff_lines(run, reference)
      out += ['', f'Config diff vs {reference.name if reference else "-"}:', '', '```',
              '\n'.join(diff) or '(identical)', '```']
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(out) + '\n')


def write_report(runs: list[Run], reference: Run | None, out_dir: str,
                 artifacts=None) -> dict:
  """The report; with `artifacts` (stlm.report.artifacts.scan) also the artifact-size view."""
  from stlm.report import plots as plots_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  names = plots_lib.write_all(runs, out_dir, artifacts)
  paths = dict(html=os.path.join(out_dir, 'index.html'),
               markdown=os.path.join(out_dir, 'README.md'))
  write_html(runs, reference, names, paths['html'], artifacts)
  write_markdown(runs, reference, names, paths['markdown'], artifacts)
  paths['plots'] = [os.path.join(out_dir, n) for n in names]
  return paths
