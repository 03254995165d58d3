"""Equal-core comparison: baseline vs byte-pool paper vs byte-pool v2 (+ v2 ablations).

  python -m stlm.experiments.equal_core --core=4x128 --context=128 --batch=16 --steps=600 \
      --data=../shared/data/corpus/wikipedia_en --workdir=runs/equal_core

Every row trains the same core (layers x hidden, heads, FFN, context) on the same data
with the same seed, batch and steps, so the same number of targets (tokens = chunks, one chunk
per GPT-2 token) is seen. Then each export scores the same held-out documents (the first
--eval_docs of the validation split) with the scorer: bits per byte = summed nats / ln 2 /
UTF-8 bytes. The table (markdown, also written to <workdir>/table.md) gives parameters, the
byte encoder + decoder (or embedding + head), training FLOPs per target, wall time, train
throughput and held-out bits per byte. A finished row is not retrained (its export and
result are reused), so an interrupted comparison resumes.

With --diagnostics (default), each byte-pool row also gets the information-only diagnostics
of stlm/experiments/core_diagnostics.py on the same held-out documents, paired on its trained
params: bits/byte added with the core outputs replaced by their batch mean (mean-y cost) or
by another document's (shuffled-y cost), the model's bits/byte split by slot class (first
symbol of a chunk, later bytes, END_OF_CHUNK; the three add up to its bits/byte) and the
byte encoder : byte decoder gradient-norm ratio. Rows without a core-output hook (the
baseline) show '-'. A finished row without them gets them from its export.
"""

import json

import os
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax

from stlm import export as export_lib
from stlm.data import pipeline
from stlm.data import tfds_builders
from stlm.eval import perplexity
from stlm.eval import scorer as scorer_lib
from stlm.config import files
from stlm.experiments import core_diagnostics
from stlm.experiments import rows
from stlm.experiments.rows import ROWS
from stlm.models import factory
from stlm.train import loop
from stlm.train import metrics as metrics_lib

_CONFIGS_DIR = flags.DEFINE_string('configs_dir', files.DEFAULT_DIR,
                                   'folder of the config files the rows name.')
_CORE = flags.DEFINE_string('core', '4x128', 'layers x hidden of the shared core.')
_HEADS = flags.DEFINE_string('heads', '4/2', 'attention heads / kv heads of the core.')
_FFN = flags.DEFINE_integer('ffn', 0, 'FFN width of the core (0 = 3 x hidden).')
_CONTEXT = flags.DEFINE_integer('context', 128, 'context: tokens = chunks.')
_BATCH = flags.DEFINE_integer('batch', 16, 'rows per step.')
_STEPS = flags.DEFINE_integer('steps', 600, 'train steps.')
_LR = flags.DEFINE_float('lr', 3e-3, 'peak learning rate (warmup 10% of steps, cosine).')
_DATA = flags.DEFINE_string('data', '../shared/data/corpus/wikipedia_en',
                            'directory of .txt/.jsonl documents (data.source=local).')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'tfds ArrayRecord cache (default: stlm\'s).')
_ROWS = flags.DEFINE_list('rows', 'baseline,paper,v2',
                          f'comparison rows to run, of {",".join(ROWS)}.')
_EVAL_DOCS = flags.DEFINE_integer('eval_docs', 40, 'held-out documents scored per row.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/equal_core', 'one subdirectory per row.')
_SEED = flags.DEFINE_integer('seed', 0, 'seed of init and data order (same for every row).')
_DIAGNOSTICS = flags.DEFINE_bool(
    'diagnostics', True, 'byte-pool rows: mean-y / shuffled-y costs, per-slot bits and the '
    'encoder : decoder gradient ratio on the held-out documents (core_diagnostics.py).')


def row_experiment_config(name: str):
  """The config of one row: its family's tiny preset, then the shared core and training."""
  if name not in ROWS:
    raise app.UsageError(f'--rows: unknown {name!r}; choose from {", ".join(ROWS)}')
  c = rows.row_config(name, _CONFIGS_DIR.value)
  layers, hidden = (int(x) for x in _CORE.value.lower().split('x'))
  heads, kv = (int(x) for x in _HEADS.value.split('/'))
  c.model.update(num_layers=layers, hidden_dim=hidden, num_heads=heads, num_kv_heads=kv,
                 ffn_dim=_FFN.value or 3 * hidden, max_len=_CONTEXT.value, dropout=0.0)
  c.name = f'equal_core_{name}'
  c.seed = _SEED.value
  c.train.update(batch_size=_BATCH.value, grad_accum=1, steps=_STEPS.value, lr=_LR.value,
                 warmup_steps=max(_STEPS.value // 10, 1), log_every=max(_STEPS.value // 20, 1),
                 eval_every=_STEPS.value, eval_batches=4, ckpt_every=_STEPS.value)
  c.data.update(source='local', path=os.path.abspath(_DATA.value), decode_errors='replace',
                val_fraction=0.02)
  if _DATA_DIR.value:
    c.data.data_dir = _DATA_DIR.value
  return c


def held_out_texts(config, n: int) -> list[str]:
  docs = pipeline.document_dataset(config, 'validation')
  return [tfds_builders.record_text(docs[i]) for i in range(min(n, len(docs)))]


def row_diagnostics(exported) -> dict | None:
  """core_diagnostics.diagnose on the row's held-out documents; None for a model without the
  core-output hook."""
  if not core_diagnostics.supported(exported.model):
    return None
  return core_diagnostics.diagnose(exported.model, exported.params, exported.featurizer,
                                   held_out_texts(exported.config, _EVAL_DOCS.value))


def run_row(name: str) -> dict:
  config = row_experiment_config(name)
  workdir = os.path.join(_WORKDIR.value, name)
  result_path = os.path.join(workdir, 'result.json')
  exported = None
  if os.path.exists(result_path):
    with open(result_path) as f:
      result = json.load(f)
  else:
    start = time.perf_counter()
    loop.train(config, workdir)
    wall = time.perf_counter() - start
    exported = export_lib.load_export(os.path.join(workdir, 'export'))
    result = score_row(name, exported, workdir, wall)
  if _DIAGNOSTICS.value and 'diagnostics' not in result:
    exported = exported or export_lib.load_export(os.path.join(workdir, 'export'))
    result['diagnostics'] = row_diagnostics(exported)
  with open(result_path, 'w') as f:
    json.dump(result, f, indent=1)
  return result


def score_row(name: str, exported, workdir: str, wall: float) -> dict:
  """The row's parameters, FLOPs, throughput (from metrics.jsonl) and held-out bits/byte."""
  breakdown = factory.param_breakdown(exported.params, exported.config.model)
  scorer = scorer_lib.Scorer(exported.model, exported.params, exported.featurizer)
  ppl = perplexity.perplexity(scorer, held_out_texts(exported.config, _EVAL_DOCS.value))
  rates = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      m = json.loads(line)
      if m.get('split') == 'train' and 'targets_per_s' in m:
        rates.append(m['targets_per_s'])
  return dict(
      row=name, params=breakdown['total'],
      embed_head=breakdown['embedding'] + breakdown['head'],
      flops_per_target=metrics_lib.flops_per_unit(exported.config, breakdown),
      wall_s=wall, targets_per_s=sorted(rates)[len(rates) // 2] if rates else float('nan'),
      bits_per_byte=ppl['bits_per_byte'], documents=ppl['documents'], bytes=ppl['bytes'])


# Diagnostics columns: header -> the cell of a row's diagnostics dict.
DIAGNOSTIC_COLUMNS = {
    'mean-y cost': lambda d: f"{d['mean_y_cost']:+.4f}",
    'shuffled-y cost': lambda d: f"{d['shuffled_y_cost']:+.4f}",
    'first bits': lambda d: f"{d['slot_bits_per_byte']['first']:.4f}",
    'later bits': lambda d: f"{d['slot_bits_per_byte']['later']:.4f}",
    'EOC bits': lambda d: f"{d['slot_bits_per_byte']['end_of_chunk']:.4f}",
    'grad enc:dec': lambda d: f"{d['grad_ratio']:.3g}",
}
DIAGNOSTICS_LEGEND = (
    'mean-y / shuffled-y cost: held-out bits/byte added with the core outputs replaced by '
    'their batch mean / by another document\'s; first / later / EOC bits: the bits/byte of '
    'the first symbol of each chunk, the later bytes and END_OF_CHUNK (they add up to the '
    'bits/byte); grad enc:dec: gradient-norm ratio byte encoder : byte decoder; '
    '\'-\': no core-output hook (baseline) or not computed.')


def table(results: list[dict], diagnostics: bool = True) -> str:
  base = next((r['bits_per_byte'] for r in results if r['row'] == 'baseline'), None)
  extra = list(DIAGNOSTIC_COLUMNS) if diagnostics else []
  header = ['row', 'params', 'byte enc+dec / embed+head', 'train GFLOPs/target', 'wall time',
            'train targets/s', 'held-out bits/byte', 'vs baseline'] + extra
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in results:
    ratio = f"{r['bits_per_byte'] / base:.3f}x" if base else '-'
    d = r.get('diagnostics')
    cells = [cell(d) if d else '-' for cell in DIAGNOSTIC_COLUMNS.values()] if extra else []
    lines.append(f"| {r['row']} | {r['params'] / 1e6:.2f}M | {r['embed_head'] / 1e6:.3f}M | "
                 f"{r['flops_per_target'] / 1e9:.4f} | {r['wall_s']:.0f} s | "
                 f"{r['targets_per_s']:.0f} | {r['bits_per_byte']:.4f} | {ratio} |"
                 + ''.join(f' {c} |' for c in cells))
  if extra:
    lines += ['', DIAGNOSTICS_LEGEND]
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  results = []
  for name in _ROWS.value:
    row_experiment_config(name)   # an unknown name stops the run before anything trains
  for name in _ROWS.value:
    results.append(run_row(name))
    text = table(results, _DIAGNOSTICS.value)
    with open(os.path.join(_WORKDIR.value, 'table.md'), 'w') as f:
      f.write(f'core {_CORE.value}, heads {_HEADS.value}, context {_CONTEXT.value}, batch '
              f'{_BATCH.value}, {_STEPS.value} steps, seed {_SEED.value}, data {_DATA.value}, '
              f'{_EVAL_DOCS.value} held-out documents; {jax.device_count()} x '
              f'{jax.devices()[0].device_kind}\n\n{text}\n')
    print(text, flush=True)



if __name__ == '__main__':
  app.run(main)
