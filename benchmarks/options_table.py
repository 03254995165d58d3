"""Trains named configs at one preset on one corpus and prints a markdown comparison table.

  python benchmarks/options_table.py --data=../shared/data/corpus/tinystories \
      --out=/tmp/options_runs --steps=300 --kinds=baseline,byte_pool \
      --configs=baseline,ffn_sharing,albert_sharing,ffn_sharing_lora,wsd,dropout_early,dropout_late

Each run is `python main.py --config=configs/<name>.py:<preset> --config.model.kind=<kind>`
with the same steps, seed and data; the table gives parameters (total and core), the final
validation bits per byte, and the median training throughput (targets/s: tokens for the
baseline, chunks for byte_pool) from each run's metrics.jsonl. A dropout schedule's switch
step is scaled with --steps (same fraction of the run as at the preset). Runs are sequential;
on a shared machine the throughput column is only comparable within one invocation.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def scaled_overrides(name, args) -> list[str]:
  """Keeps a dropout schedule's switch at the same fraction of the run when --steps differs
  from the preset's steps (the named configs set it from the preset)."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))   # the config files import stlm
  spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  train = module.get_config(args.preset).train
  switch = train.get('dropout_schedule_steps', 0)
  if not switch or train.steps == args.steps:
    return []
  return [f'--config.train.dropout_schedule_steps={max(switch * args.steps // train.steps, 1)}']


def run(name, kind, args):
  workdir = pathlib.Path(args.out, f'{name}_{kind}')
  cmd = [sys.executable, 'main.py', f'--config=configs/{name}.py:{args.preset}',
         f'--config.model.kind={kind}', f'--config.train.steps={args.steps}',
         f'--config.seed={args.seed}', '--config.data.source=local',
         f'--config.data.path={os.path.abspath(args.data)}',
         f'--config.data.data_dir={os.path.abspath(os.path.join(args.out, "tfds"))}',
         f'--workdir={workdir}'] + scaled_overrides(name, args)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  log = proc.stdout + proc.stderr
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'run.log').write_text(log)
  if proc.returncode:
    return dict(name=name, kind=kind, error=log[-800:])
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  val = [r for r in rows if r['split'] == 'validation']
  train = [r for r in rows if r['split'] == 'train']
  params = re.search(r'parameters: .*?core ([\d,]*\d), total ([\d,]*\d)', log)
  return dict(name=name, kind=kind, core=params.group(1), total=params.group(2),
              bpb=val[-1]['bits_per_byte'], bpb0=val[0]['bits_per_byte'],
              rate=statistics.median(r['targets_per_s'] for r in train[1:] or train))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--configs', default='baseline,ffn_sharing,albert_sharing,ffn_sharing_lora,'
                 'wsd,dropout_early,dropout_late')
  p.add_argument('--kinds', default='baseline,byte_pool')
  p.add_argument('--preset', default='tiny')
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args()
  print('| config | kind | params (core) | val bits/byte (step 0 -> end) | targets/s |')
  print('|---|---|---|---|---|', flush=True)
  for kind in args.kinds.split(','):
    for name in args.configs.split(','):
      r = run(name, kind, args)
      if 'error' in r:
        print(f'| {name} | {kind} | failed: {r["error"][-200:]!r} | | |', flush=True)
        continue
      print(f'| {name} | {kind} | {r["total"]} ({r["core"]}) | {r["bpb0"]:.3f} -> '
            f'{r["bpb"]:.3f} | {r["rate"]:.0f} |', flush=True)


if __name__ == '__main__':
  main()
