"""python -m stlm.report runs/ [--out report/] [--reference=<run>].

Scans a directory of runs (finished, running or crashed) and writes index.html, README.md
and PNG plots into --out (default ./report); with every export found there (compressed ones
included), the artifact-size view: bits per byte against megabytes on disk and as .tar.xz.
"""

import os

from absl import app
from absl import flags

from stlm import cli_errors
from stlm.report import artifacts
from stlm.report import collect
from stlm.report import render
from stlm.report import table

_OUT = flags.DEFINE_string('out', 'report', 'Output directory for index.html, README.md, PNGs.')
_REF = flags.DEFINE_string('reference', None, 'Run that config diffs are taken against '
                           '(default: the first baseline-kind run, else the first run).')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m stlm.report <runs directory> [--out report/]')
  runs = collect.scan(argv[1])
  if not runs:
    raise FileNotFoundError(f'no runs under {argv[1]} (a run holds run.json, metrics.jsonl '
                            'or export/config.json)')
  try:
    reference = table.pick_reference(runs, _REF.value)
  except ValueError as e:   # an unknown --reference: the message lists the runs
    raise cli_errors.FlagError(str(e)) from None
  cli_errors.check_output_dir('--out', _OUT.value)
  exports = artifacts.scan(argv[1])
  # Written beside --out, then renamed in: an error leaves the previous report whole.
  with cli_errors.staged_dir(_OUT.value) as staging:
    paths = render.write_report(runs, reference, staging, exports)
  paths = {k: ([os.path.join(_OUT.value, os.path.basename(p)) for p in v] if k == 'plots'
               else os.path.join(_OUT.value, os.path.basename(v))) for k, v in paths.items()}
  print(table.markdown(runs))
  if exports:
    print('\n' + artifacts.markdown(exports))
  print(f"\nwrote {paths['html']}, {paths['markdown']} and {len(paths['plots'])} plots")


if __name__ == '__main__':
  cli_errors.run(main)
