"""The byte-pool comparison: BPE baseline, plain byte-level model, local-only byte model and
byte-pool rows, at equal core, equal total parameters and equal training FLOPs, over seeds.

  python -m stlm.experiments.equal_core --core=4x128 --context=128 --batch=16 --steps=600 \
      --rows=baseline,bytes,local_only,v2_cross,core_chunk --seeds=0,1 --compare=core,params \
      --data=../shared/data/corpus/wikipedia_en \
      --ood_data=../shared/data/corpus/simplebooks-92/test.txt --workdir=runs/equal_core

Comparisons (--compare):
- core: every row trains the same core (layers x hidden, heads, FFN, context in GPT-2
  tokens) on the same data with the same seed, batch and steps, so the same text is seen: the
  byte-level row ('bytes') gets the context in bytes that covers the same text (context x the
  corpus's bytes per GPT-2 token, measured on its first training documents); 'local_only' is
  the byte-pool decoder alone (rows.py).
- params: each row with a core other than the baseline gets a deeper core (width
  --params_hidden) of as many layers as bring its total parameters closest to the
  baseline's: the paper's proposal, a byte model with the BPE model's parameter count.
- flops: each row with a core trains as many steps as give the baseline's training FLOPs
  (FLOPs per target x targets per step, the model kind's own count).
A row that a comparison leaves unchanged (the baseline) is trained once and shared.

Each export then scores the same held-out documents (the first --eval_docs of the validation
split) with the scorer: bits per byte = summed nats / ln 2 / UTF-8 bytes; with --ood_data also
the first --ood_docs documents (of at least --ood_min_bytes bytes) of an out-of-domain
corpus. With --diagnostics (default), each byte-pool run also gets the information-only
diagnostics of stlm/experiments/core_diagnostics.py on both document sets, paired on its
trained params (mean-y / shuffled-y cost, bits by slot class, encoder : decoder gradient
ratio). The table (stlm/experiments/comparison_table.py; <workdir>/table.md) pools seeds
(mean ± half range); with --plot, <workdir>/flops.png plots bits/byte against training FLOPs.
A finished run is not retrained (its export and result are reused; a missing figure is
computed from the export), so an interrupted comparison resumes.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax

from stlm import cli_errors
from stlm import export as export_lib
from stlm import tokenizers
from stlm.config import files
from stlm.data import corpus
from stlm.data import pipeline
from stlm.data import tfds_builders
from stlm.eval import perplexity
from stlm.eval import scorer as scorer_lib
from stlm.experiments import comparison_table
from stlm.experiments import core_diagnostics
from stlm.experiments import rows
from stlm.experiments.rows import ROWS
from stlm.models import factory
from stlm.train import loop
from stlm.train import metrics as metrics_lib

COMPARISONS = ('core', 'params', 'flops')

_CONFIGS_DIR = flags.DEFINE_string('configs_dir', files.DEFAULT_DIR,
                                   'folder of the config files the rows name.')
_CORE = flags.DEFINE_string('core', '4x128', 'layers x hidden of the shared core.')
_HEADS = flags.DEFINE_string('heads', '4/2', 'attention heads / kv heads of the core.')
_FFN = flags.DEFINE_integer('ffn', 0, 'FFN width of the core (0 = 3 x hidden).')
_CONTEXT = flags.DEFINE_integer('context', 128, 'context in GPT-2 tokens (= byte-pool chunks).')
_BATCH = flags.DEFINE_integer('batch', 16, 'rows per step.')
_STEPS = flags.DEFINE_integer('steps', 600, 'train steps (comparison core and params).')
_LR = flags.DEFINE_float('lr', 3e-3, 'peak learning rate (warmup 10% of steps, cosine).')
_DATA = flags.DEFINE_string('data', '../shared/data/corpus/wikipedia_en',
                            'directory of .txt/.jsonl documents (data.source=local).')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'tfds ArrayRecord cache (default: stlm\'s).')
_ROWS = flags.DEFINE_list('rows', 'baseline,bytes,local_only,v2_cross,core_chunk',
                          f'comparison rows to run, of {",".join(ROWS)}.')
_SEEDS = flags.DEFINE_list('seeds', '0', 'seeds of init and data order (each row, each seed).')
_COMPARE = flags.DEFINE_list('compare', 'core', f'comparisons, of {",".join(COMPARISONS)}.')
_PARAMS_HIDDEN = flags.DEFINE_integer('params_hidden', 0,
                                      'core width of the equal-params rows (0 = 2 x hidden).')
_EVAL_DOCS = flags.DEFINE_integer('eval_docs', 40, 'held-out documents scored per row.')
_OOD_DATA = flags.DEFINE_string('ood_data', '', 'out-of-domain documents (.txt/.jsonl file or '
                                'folder) also scored and diagnosed; empty: none.')
_OOD_DOCS = flags.DEFINE_integer('ood_docs', 40, 'out-of-domain documents scored per row.')
_OOD_MIN_BYTES = flags.DEFINE_integer('ood_min_bytes', 200,
                                      'shorter out-of-domain documents are skipped.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/equal_core',
                               'one subdirectory per comparison / seed / row.')
_DIAGNOSTICS = flags.DEFINE_bool(
    'diagnostics', True, 'byte-pool rows: mean-y / shuffled-y costs, per-slot bits and the '
    'encoder : decoder gradient ratio on the held-out documents (core_diagnostics.py).')
_PLOT = flags.DEFINE_bool('plot', True, 'write <workdir>/flops.png (bits/byte vs FLOPs).')


def shared_core() -> rows.Core:
  try:
    return rows.Core.parse(_CORE.value, _HEADS.value, _CONTEXT.value, _FFN.value)
  except ValueError:
    raise cli_errors.FlagError(f'--core={_CORE.value} / --heads={_HEADS.value}: write layers x '
                               'hidden as 4x128 and heads / kv heads as 4/2') from None


def bytes_per_token() -> float:
  """UTF-8 bytes per GPT-2 token of the first 200 training documents (in <workdir>, so every
  run of a comparison uses the same figure)."""
  path = os.path.join(_WORKDIR.value, 'bytes_per_token.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)['bytes_per_token']
  config = rows.row_config('baseline', _CONFIGS_DIR.value)
  _set_data(config)
  docs = pipeline.document_dataset(config, 'train')
  texts = [tfds_builders.record_text(docs[i]) for i in range(min(200, len(docs)))]
  stats = pipeline.corpus_stats(texts, tokenizers.GPT2Tokenizer())
  stats['bytes_per_token'] = 1.0 / stats['tokens_per_byte']
  with open(path, 'w') as f:
    json.dump(stats, f, indent=1)
  return stats['bytes_per_token']


def _set_data(c):
  c.data.update(source='local', path=os.path.abspath(_DATA.value), decode_errors='replace',
                val_fraction=0.02)
  if _DATA_DIR.value:
    c.data.data_dir = _DATA_DIR.value


def _set_training(c, name: str, seed: int, steps: int):
  c.name = f'equal_core_{name}'
  c.seed = seed
  c.train.update(batch_size=_BATCH.value, grad_accum=1, steps=steps, lr=_LR.value,
                 warmup_steps=max(steps // 10, 1), log_every=max(steps // 20, 1),
                 eval_every=steps, eval_batches=4, ckpt_every=steps)
  _set_data(c)


def _vocab(c) -> int:
  return tokenizers.build_tokenizer(c.tokenizer).vocab_size


# Model config JSON -> its parameter breakdown: the equal-params depth search and the run
# directories ask for the same configs many times.
_BREAKDOWNS: dict[str, dict] = {}


def _counts(c) -> dict:
  """Parameter breakdown of config c (its tokenizer's vocabulary), without allocating."""
  m = c.model
  m.vocab_size = _vocab(c)
  key = m.to_json()
  if key not in _BREAKDOWNS:
    _BREAKDOWNS[key] = factory.param_breakdown(
        factory.abstract_params(factory.build_model(m), m), m)
  return _BREAKDOWNS[key]


def _flops_per_step(c) -> float:
  return metrics_lib.flops_per_unit(c, _counts(c)) * c.train.batch_size * c.model.max_len


def check_names(names, comparisons) -> None:
  """UsageError for a row or comparison name that does not exist."""
  for name in names:
    if name not in ROWS:
      raise app.UsageError(f'--rows: unknown {name!r}; choose from {", ".join(ROWS)}')
  for comparison in comparisons:
    if comparison not in COMPARISONS:
      raise app.UsageError(f'--compare: unknown {comparison!r}; choose from '
                           f'{", ".join(COMPARISONS)}')


def check_inputs() -> None:
  """Every flag that can be checked without training, so a mistake costs no wait (the corpus
  is read, and the workdir written, only after this)."""
  check_names(_ROWS.value, _COMPARE.value)
  bad_seeds = [s for s in _SEEDS.value if not s.lstrip('-').isdigit()]
  if bad_seeds:
    raise cli_errors.FlagError(f'--seeds: {", ".join(bad_seeds)} not an integer')
  shared_core()
  for flag, value in (('--steps', _STEPS.value), ('--batch', _BATCH.value),
                      ('--context', _CONTEXT.value), ('--eval_docs', _EVAL_DOCS.value)):
    if value < 1:
      raise cli_errors.FlagError(f'{flag}={value} must be >= 1')
  if not os.path.exists(_DATA.value):
    raise cli_errors.FlagError(f'--data={_DATA.value} does not exist (a directory of '
                               '.txt/.jsonl documents)')
  if _OOD_DATA.value and not os.path.exists(_OOD_DATA.value):
    raise cli_errors.FlagError(f'--ood_data={_OOD_DATA.value} does not exist')
  if not os.path.isdir(_CONFIGS_DIR.value):
    raise cli_errors.FlagError(f'--configs_dir={_CONFIGS_DIR.value} does not exist')
  cli_errors.check_output_dir('--workdir', _WORKDIR.value)


def row_experiment_config(name: str, seed: int = 0, comparison: str = 'core'):
  """The config of one run: its row around the shared core, then the comparison's change."""
  check_names([name], [comparison])
  core = shared_core()
  c = rows.shared_core_config(name, core, bytes_per_token=bytes_per_token(),
                              configs_dir=_CONFIGS_DIR.value)
  _set_training(c, name, seed, _STEPS.value)
  if comparison == 'params' and name != 'baseline' and ROWS[name].has_core:
    _match_baseline_params(c, core)
  elif comparison == 'flops' and name != 'baseline' and ROWS[name].has_core:
    base = row_experiment_config('baseline', seed)
    c.train.steps = max(1, round(_flops_per_step(base) * base.train.steps / _flops_per_step(c)))
    _set_training(c, name, seed, c.train.steps)
  return c


def _match_baseline_params(c, core: rows.Core) -> None:
  """Sets c's core to --params_hidden wide and as deep as brings its total parameters
  closest to the baseline's (at least core.layers deep)."""
  target = _counts(row_experiment_config('baseline'))['total']
  hidden = _PARAMS_HIDDEN.value or 2 * core.hidden
  c.model.update(hidden_dim=hidden, ffn_dim=3 * hidden)
  best = None
  for layers in range(core.layers, 64):
    c.model.num_layers = layers
    gap = _counts(c)['total'] - target
    if best is None or abs(gap) < abs(best[1]):
      best = (layers, gap)
    if gap > 0:
      break
  c.model.num_layers = best[0]


def held_out_texts(config, n: int) -> list[str]:
  docs = pipeline.document_dataset(config, 'validation')
  return [tfds_builders.record_text(docs[i]) for i in range(min(n, len(docs)))]


def ood_texts() -> list[str]:
  """The first --ood_docs documents of --ood_data with at least --ood_min_bytes bytes."""
  out = []
  for _, text in corpus.local_documents(_OOD_DATA.value, decode_errors='replace'):
    if len(text.encode('utf-8')) >= _OOD_MIN_BYTES.value:
      out.append(text)
      if len(out) == _OOD_DOCS.value:
        break
  return out


def run_dir(name: str, seed: int, comparison: str) -> str:
  """<workdir>/<comparison>/seed<seed>/<row>; the core comparison's for an unchanged row."""
  if comparison != 'core':
    same = (row_experiment_config(name, seed, comparison).to_dict()
            == row_experiment_config(name, seed).to_dict())
    comparison = 'core' if same else comparison
  return os.path.join(_WORKDIR.value, comparison, f'seed{seed}', name)


def run_row(name: str, seed: int = 0, comparison: str = 'core') -> dict:
  """Trains (unless done), scores and diagnoses one run; its result dict."""
  config = row_experiment_config(name, seed, comparison)
  workdir = run_dir(name, seed, comparison)
  result_path = os.path.join(workdir, 'result.json')
  result, exported = {}, None
  if os.path.exists(result_path):
    with open(result_path) as f:
      result = json.load(f)
  else:
    start = time.perf_counter()
    loop.train(config, workdir)
    result['wall_s'] = time.perf_counter() - start
  load = lambda: exported or export_lib.load_export(os.path.join(workdir, 'export'))
  if 'bits_per_byte' not in result:
    exported = load()
    result.update(score_row(name, exported, workdir))
  result.update(row=name, seed=seed, comparison=comparison,
                bytes_per_target=1.0 if ROWS[name].tokenizer == 'bytes' else bytes_per_token(),
                train_flops=result['flops_per_target'] * config.train.steps
                * config.train.batch_size * config.model.max_len)
  if _OOD_DATA.value and 'ood_bits_per_byte' not in result:
    exported = load()
    result['ood_data'] = _OOD_DATA.value
    result['ood_bits_per_byte'] = _bits_per_byte(exported, ood_texts())
  if _DIAGNOSTICS.value and 'diagnostics' not in result:
    exported = load()
    result['diagnostics'] = row_diagnostics(exported, held_out_texts(exported.config,
                                                                     _EVAL_DOCS.value))
  if _DIAGNOSTICS.value and _OOD_DATA.value and 'ood_diagnostics' not in result:
    exported = load()
    result['ood_diagnostics'] = row_diagnostics(exported, ood_texts())
  with open(result_path, 'w') as f:
    json.dump(result, f, indent=1)
  return result


def row_diagnostics(exported, texts) -> dict | None:
  """core_diagnostics.diagnose on `texts`; None for a model without the core-output hook."""
  if not core_diagnostics.supported(exported.model):
    return None
  return core_diagnostics.diagnose(exported.model, exported.params, exported.featurizer, texts)


def _bits_per_byte(exported, texts) -> float:
  scorer = scorer_lib.Scorer(exported.model, exported.params, exported.featurizer)
  return perplexity.perplexity(scorer, texts)['bits_per_byte']


def score_row(name: str, exported, workdir: str) -> dict:
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
      core_layers=exported.config.model.num_layers, core_hidden=exported.config.model.hidden_dim,
      flops_per_target=metrics_lib.flops_per_unit(exported.config, breakdown),
      targets_per_s=sorted(rates)[len(rates) // 2] if rates else float('nan'),
      bits_per_byte=ppl['bits_per_byte'], documents=ppl['documents'], bytes=ppl['bytes'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)
  check_inputs()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  runs = [(c, int(s), name) for c in _COMPARE.value for s in _SEEDS.value for name in _ROWS.value]
  for comparison, seed, name in runs:
    row_experiment_config(name, seed, comparison)   # a bad name stops it before any training
  results = []
  for comparison, seed, name in runs:
    results.append(run_row(name, seed, comparison))
    text = comparison_table.table(results, _DIAGNOSTICS.value)
    with open(os.path.join(_WORKDIR.value, 'table.md'), 'w') as f:
      f.write(f'core {_CORE.value}, heads {_HEADS.value}, context {_CONTEXT.value}, batch '
              f'{_BATCH.value}, {_STEPS.value} steps, lr {_LR.value}, seeds '
              f'{",".join(_SEEDS.value)}, data {_DATA.value}, {_EVAL_DOCS.value} held-out '
              f'documents; OOD {_OOD_DATA.value or "-"} ({_OOD_DOCS.value} documents); '
              f'{jax.device_count()} x {jax.devices()[0].device_kind}\n\n{text}\n')
    print(text, flush=True)
  if _PLOT.value:
    comparison_table.plot(results, os.path.join(_WORKDIR.value, 'flops.png'))


if __name__ == '__main__':
  cli_errors.run(main)
