"""Bits per byte against size on disk: tiny models trained on local text, then compressed.

  python -m stlm.experiments.compression \
      --data=../shared/data/corpus/wikipedia_en/shard_00.jsonl --steps=400 --seed=0 \
      --workdir=runs/compression

Each --configs file (tiny preset, data.source=local on --data) trains --steps steps into
<workdir>/<config>, exporting to <workdir>/<config>/export. Each export then goes through
`stlm.compress` once per setting of SETTINGS (fp32 is the tool with every method off) into
<workdir>/<config>_<setting>/export, and each of those scores the same held-out documents
(the first --eval_docs of the validation split, written to <workdir>/heldout.jsonl, so that
`python -m stlm.eval --benchmarks= --text=<workdir>/heldout.jsonl` reproduces any row). Its
results.json lies beside the export, as stlm.eval writes it, so `python -m stlm.report
<workdir>` shows the artifact-size view. The table goes to <workdir>/table.md. A finished
step is not redone, so an interrupted run resumes.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging as absl_logging

from stlm import cli_errors
from stlm import compress
from stlm import export as export_lib
from stlm.compress import artifact
from stlm.config import files
from stlm.data import pipeline
from stlm.data import tfds_builders
from stlm.eval import perplexity
from stlm.eval import scorer as scorer_lib
from stlm.eval import zero_shot
from stlm.train import loop

# (name, settings): the measured settings, in table order.
SETTINGS = (
    ('fp32', compress.Settings()),
    ('bf16', compress.Settings(quantize='bf16')),
    ('int8', compress.Settings(quantize='int8')),
    ('int4', compress.Settings(quantize='int4', group_size=64)),
    ('prune50', compress.Settings(prune=0.5)),
    ('prune90', compress.Settings(prune=0.9)),
    ('low_rank', compress.Settings(low_rank=('*',), rank=32)),
    # Where pruning's cost comes from: one threshold for all arrays, and the tables kept.
    ('prune50_global', compress.Settings(prune=0.5, prune_scope='global')),
    ('prune50_no_tables', compress.Settings(prune=0.5, embeddings=False, byte_tables=False)),
    ('int8_prune50', compress.Settings(quantize='int8', prune=0.5)),
)

_CONFIGS = flags.DEFINE_list('configs', 'baseline,byte_pool', 'config files (configs/<name>.py) '
                             'to train at the tiny preset.')
_CONFIGS_DIR = flags.DEFINE_string('configs_dir', files.DEFAULT_DIR, 'folder of the configs.')
_DATA = flags.DEFINE_string('data', '../shared/data/corpus/wikipedia_en/shard_00.jsonl',
                            '.txt/.jsonl file or folder of documents (data.source=local).')
_STEPS = flags.DEFINE_integer('steps', 400, 'train steps of each model.')
_SEED = flags.DEFINE_integer('seed', 0, 'seed of init and data order.')
_EVAL_DOCS = flags.DEFINE_integer('eval_docs', 40, 'held-out documents scored per export.')
_SETTINGS = flags.DEFINE_list('settings', [n for n, _ in SETTINGS], 'settings to measure, of '
                              f'{",".join(n for n, _ in SETTINGS)}.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/compression', 'runs, compressed exports and '
                               'table.md.')


def run_config(name: str):
  c = files.load(os.path.join(_CONFIGS_DIR.value, f'{name}.py'), 'tiny')
  c.seed = _SEED.value
  c.data.update(source='local', path=os.path.abspath(_DATA.value), decode_errors='replace',
                val_fraction=0.02)
  steps = _STEPS.value
  c.train.update(steps=steps, warmup_steps=max(steps // 10, 1), log_every=max(steps // 20, 1),
                 eval_every=steps, eval_batches=4, ckpt_every=steps)
  return c


def check_inputs() -> None:
  known = dict(SETTINGS)
  for s in _SETTINGS.value:
    if s not in known:
      raise cli_errors.FlagError(f'--settings: unknown {s!r}; choose from {", ".join(known)}')
  for name in _CONFIGS.value:
    path = os.path.join(_CONFIGS_DIR.value, f'{name}.py')
    if not os.path.isfile(path):
      raise cli_errors.FlagError(f'--configs: {path} does not exist')
  for flag, value in (('--steps', _STEPS.value), ('--eval_docs', _EVAL_DOCS.value)):
    if value < 1:
      raise cli_errors.FlagError(f'{flag}={value} must be >= 1')
  if not os.path.exists(_DATA.value):
    raise cli_errors.FlagError(f'--data={_DATA.value} does not exist')
  cli_errors.check_output_dir('--workdir', _WORKDIR.value)


def _finished(run_dir: str) -> bool:
  try:
    with open(os.path.join(run_dir, 'run.json')) as f:
      return json.load(f).get('status') == 'finished' and export_lib.is_export(
          os.path.join(run_dir, 'export'))
  except (OSError, ValueError):
    return False


def held_out(config) -> tuple[str, list[str]]:
  """The held-out documents (the first --eval_docs of the validation split), also written
  as <workdir>/heldout.jsonl for stlm.eval --text."""
  docs = pipeline.document_dataset(config, 'validation')
  texts = [tfds_builders.record_text(docs[i]) for i in range(min(_EVAL_DOCS.value, len(docs)))]
  path = os.path.join(os.path.abspath(_WORKDIR.value), 'heldout.jsonl')
  with cli_errors.atomic_file(path) as f:
    f.writelines(json.dumps({'text': t}) + '\n' for t in texts)
  return path, texts


def score(export_dir: str, texts: list[str], text_path: str) -> dict:
  """Held-out bits per byte of an export, written to results.json beside it as stlm.eval
  --text writes it."""
  results_path = os.path.join(os.path.dirname(export_dir), 'results.json')
  if os.path.exists(results_path):
    with open(results_path) as f:
      return json.load(f)
  exported = export_lib.load_export(export_dir)
  scorer = zero_shot.make_scorer(exported, 32)
  ppl = perplexity.perplexity(scorer, texts)
  ppl['files'] = [text_path]
  return zero_shot.write_results(results_path, exported, export_dir, {}, ppl)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)
  check_inputs()
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  settings = dict(SETTINGS)
  rows = []
  text_path = texts = None
  for name in _CONFIGS.value:
    config = run_config(name)
    run_dir = os.path.join(workdir, name)
    if not _finished(run_dir):
      start = time.perf_counter()
      loop.train(config, run_dir)
      print(f'{name}: trained in {time.perf_counter() - start:.0f} s', flush=True)
    if texts is None:   # every config reads the same data: one held-out set
      text_path, texts = held_out(config)
    for setting in _SETTINGS.value:
      out = os.path.join(workdir, f'{name}_{setting}', 'export')
      if not os.path.isfile(os.path.join(out, artifact.SIZE_FILE)):
        compress.compress_export(os.path.join(run_dir, 'export'), out, settings[setting])
      result = score(out, texts, text_path)
      size = artifact.sizes(out)
      rows.append(dict(model=name, setting=setting, label=settings[setting].label(),
                       bits_per_byte=result['perplexity']['bits_per_byte'],
                       bytes=size['bytes'], xz_bytes=size['xz_bytes']))
      print(json.dumps(rows[-1]), flush=True)
    table_md = table(rows)
    with cli_errors.atomic_file(os.path.join(workdir, 'table.md')) as f:
      f.write(f'{_STEPS.value} steps (tiny preset), seed {_SEED.value}, data {_DATA.value}, '
              f'{len(texts)} held-out documents\n\n{table_md}\n')
  print(table(rows))


def table(rows: list[dict]) -> str:
  fp32 = {r['model']: r for r in rows if r['setting'] == 'fp32'}
  lines = ['| model | setting | bits/byte | vs fp32 | MB on disk | MB .tar.xz | x smaller '
           '(disk / xz) |', '|---|---|---|---|---|---|---|']
  for r in rows:
    base = fp32.get(r['model'])
    delta = f'{r["bits_per_byte"] - base["bits_per_byte"]:+.3f}' if base else '-'
    ratio = (f'{base["bytes"] / r["bytes"]:.2f} / {base["xz_bytes"] / r["xz_bytes"]:.2f}'
             if base else '-')
    lines.append(f'| {r["model"]} | {r["label"]} | {r["bits_per_byte"]:.3f} | {delta} | '
                 f'{r["bytes"] / 1e6:.3f} | {r["xz_bytes"] / 1e6:.3f} | {ratio} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  cli_errors.run(main)
