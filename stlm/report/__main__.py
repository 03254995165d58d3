"""python -m stlm.report runs/ [--out report/] [--reference=<run>].

Scans a directory of runs (finished, running or crashed) and writes index.html, README.md
and PNG plots into --out (default ./report).
"""

import sys

from absl import app
from absl import flags

from stlm.report import collect
from stlm.report import render
from stlm.report import table

_OUT = flags.DEFINE_string('out', 'report', 'Output directory for index.html, README.md, PNGs.')
_REF = flags.DEFINE_string('reference', None, 'Run that config diffs are taken against '
                           '(default: the first baseline-kind run, else the first run).')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m stlm.report <runs directory> [--out report/]')
  try:
    runs = collect.scan(argv[1])
    if not runs:
      raise FileNotFoundError(f'no runs under {argv[1]} (a run holds run.json, metrics.jsonl '
                              'or export/config.json)')
    reference = table.pick_reference(runs, _REF.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  paths = render.write_report(runs, reference, _OUT.value)
  print(table.markdown(runs))
  print(f"\nwrote {paths['html']}, {paths['markdown']} and {len(paths['plots'])} plots")


if __name__ == '__main__':
  app.run(main)
