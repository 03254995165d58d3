"""python -m stlm.eval --checkpoint=<workdir>/export --benchmarks=blimp,... --data_dir=<dir>.

Writes results.json next to the checkpoint and prints the paper's Table 2 as Markdown.
--generative=gsm8k,lambada_gen adds the generate_until tasks (stlm/eval/generative.py)
beside the multiple-choice ones; --instruct=<file> the held-out response bits per byte of
instruction data (stlm/eval/instruct.py).
"""

import os

from absl import app
from absl import flags
from absl import logging

from stlm import cli_errors
from stlm.eval import generative
from stlm.eval import zero_shot
from stlm.eval import loaders
from stlm.eval import perplexity

_CKPT = flags.DEFINE_string('checkpoint', None, '<workdir>/export of a training run.')
_BENCH = flags.DEFINE_string('benchmarks', ','.join(zero_shot.TABLE),
                             f'Comma list of: {", ".join(zero_shot.KNOWN)} ("" = none); '
                             'name:split requests a split (arc_easy:test).')
_FALLBACK = flags.DEFINE_bool('allow_split_fallback', False, 'A requested split that is '
                              'missing falls back to the default order instead of failing.')
_PREFIX = flags.DEFINE_bool('always_prefix_eot', False, 'Prepend end-of-text to every context '
                            '(the old convention); default: only to an empty context, as '
                            'lm-evaluation-harness.')
_DATA = flags.DEFINE_string('data_dir', None, 'Directory holding the benchmark releases.')
_TEXT = flags.DEFINE_list('text', [], 'Held-out .txt/.jsonl files for bits per byte.')
_STRIDE = flags.DEFINE_integer('stride', None, 'Sliding-window stride (default: the window).')
_LIMIT = flags.DEFINE_integer('limit', None, 'Items per benchmark, drawn with --seed.')
_SEED = flags.DEFINE_integer('seed', zero_shot.DEFAULT_SEED, 'Seed of the --limit sample.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Scorer batch size.')
_SHOTS = flags.DEFINE_integer('mmlu_shots', 0, 'MMLU examples from the dev split.')
_FRACTION = flags.DEFINE_float('score_fraction', None, 'Scorer K(T) / T: share of a row\'s '
                               'positions through the output layer (default 0.5; 1.0 suits '
                               'all-target requests such as BLiMP and perplexity).')
_GEN = flags.DEFINE_list('generative', [], f'Generative tasks: {", ".join(generative.TASKS)}.')
_GEN_LIMIT = flags.DEFINE_integer('generative_limit', None, 'Items per generative task, drawn '
                                  'with --seed (default: --limit).')
_GSM_SPLIT = flags.DEFINE_string('gsm8k_split', 'test', 'GSM8K split scored (train: shots '
                                 'come from the other train items).')
_GSM_SHOTS = flags.DEFINE_integer('gsm8k_shots', generative.GSM8K_SHOTS, 'GSM8K examples '
                                  'from the train split.')
_GEN_BATCH = flags.DEFINE_integer('generative_batch', generative.GENERATIVE_BATCH,
                                  'Generative items decoded together (greedy texts do not '
                                  'depend on it).')
_INSTRUCT = flags.DEFINE_string('instruct', None, 'Instruction file (.json/.jsonl): held-out '
                                'response bits per byte.')
_TEMPLATE = flags.DEFINE_string('template', '', "With --instruct: the prompt template (default: "
                                "the export's own, recorded at fine-tuning).")
_VAL = flags.DEFINE_float('instruct_val_fraction', None, 'With --instruct: the held-out '
                          "fraction of items (default: the export's data.val_fraction).")
_LAYOUT = flags.DEFINE_string('instruct_layout', 'auto', 'With --instruct: auto | alpaca | chat.')
_OUT = flags.DEFINE_string('output', None, 'results.json path (default: beside --checkpoint).')


def _documents(paths) -> list[str]:
  """The --text documents; a file that is missing or holds no text stops the run here."""
  docs = []
  for path in paths:
    if not os.path.isfile(path):
      raise cli_errors.FlagError(f'--text={path} does not exist' if not os.path.exists(path)
                                 else f'--text={path} is not a file')
    file_docs = [d for d in perplexity.read_documents([path]) if d.strip()]
    if not file_docs:
      raise cli_errors.FlagError(f'--text={path} holds no text to score')
    docs.extend(file_docs)
  return docs


def _check_numbers() -> None:
  if _BATCH.value < 1:
    raise cli_errors.FlagError(f'--batch_size={_BATCH.value} must be >= 1')
  if _LIMIT.value is not None and _LIMIT.value < 1:
    raise cli_errors.FlagError(f'--limit={_LIMIT.value} must be >= 1 (omit it for all items)')
  if _SHOTS.value < 0:
    raise cli_errors.FlagError(f'--mmlu_shots={_SHOTS.value} must be >= 0')
  if _FRACTION.value is not None and not 0 < _FRACTION.value <= 1:
    raise cli_errors.FlagError(f'--score_fraction={_FRACTION.value} must be in (0, 1]')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # keep Orbax's restore chatter off the table
  # Every input is checked before the model is loaded, so a mistake costs no waiting.
  _check_numbers()
  try:
    specs = zero_shot.parse_specs(_BENCH.value)
  except loaders.DataError as e:   # an unknown name: the message lists the known ones
    raise cli_errors.FlagError(f'--benchmarks={_BENCH.value}: {e}') from None
  if specs and not _DATA.value:
    raise cli_errors.FlagError('--data_dir is required to run benchmarks')
  for n, split in specs:  # fail before loading the model if a benchmark's files are missing
    try:
      loaders.check_available(n, _DATA.value, None if _FALLBACK.value else split)
    except loaders.DataError as e:
      if split is None:
        raise
      raise loaders.DataError(f'{e}\n(split {split!r} was requested by --benchmarks={n}:'
                              f'{split}; --allow_split_fallback takes the first split '
                              'present instead)') from None
  unknown = [n for n in _GEN.value if n not in generative.TASKS]
  if unknown:
    raise cli_errors.FlagError(f'--generative: unknown task(s) {", ".join(unknown)}; known: '
                               f'{", ".join(generative.TASKS)}')
  if _GEN.value and not _DATA.value:
    raise cli_errors.FlagError('--data_dir is required for --generative tasks')
  generative.check_available(_GEN.value, _DATA.value, _GSM_SPLIT.value)
  if _GEN_BATCH.value < 1:
    raise cli_errors.FlagError(f'--generative_batch={_GEN_BATCH.value} must be >= 1')
  if _INSTRUCT.value and not os.path.isfile(_INSTRUCT.value):
    raise cli_errors.FlagError(f'--instruct={_INSTRUCT.value} is not a file')
  docs = _documents(_TEXT.value) if _TEXT.value else None
  zero_shot.check_causal_export(_CKPT.value)
  path = _OUT.value or os.path.join(os.path.dirname(os.path.abspath(_CKPT.value)),
                                    'results.json')
  cli_errors.check_output_file('--output' if _OUT.value else '--output (default: beside '
                               '--checkpoint)', path)
  exported = zero_shot.open_checkpoint(_CKPT.value)
  window = exported.config.model.max_len
  if _STRIDE.value is not None and not 1 <= _STRIDE.value <= window:
    raise cli_errors.FlagError(f'--stride={_STRIDE.value} must be in 1..{window} (the window)')
  scorer = zero_shot.make_scorer(exported, _BATCH.value, progress=True, verbose=True,
                                  always_prefix_eot=_PREFIX.value,
                                  score_fraction=_FRACTION.value)
  results = zero_shot.run_benchmarks(exported, _BENCH.value, _DATA.value, _LIMIT.value,
                                      seed=_SEED.value, mmlu_shots=_SHOTS.value,
                                      scorer=scorer, allow_split_fallback=_FALLBACK.value)
  limit = _GEN_LIMIT.value if _GEN_LIMIT.value is not None else _LIMIT.value
  results.update(generative.run_tasks(exported, _GEN.value, _DATA.value, limit=limit,
                                      seed=_SEED.value, gsm8k_split=_GSM_SPLIT.value,
                                      gsm8k_shots_=_GSM_SHOTS.value,
                                      batch_size=_GEN_BATCH.value))
  instruct = None
  if _INSTRUCT.value:
    from stlm.eval import instruct as instruct_lib  # pylint: disable=g-import-not-at-top
    instruct = instruct_lib.response_bits_per_byte(
        exported, _INSTRUCT.value, template=_TEMPLATE.value, layout=_LAYOUT.value,
        val_fraction=_VAL.value, batch_size=_BATCH.value)
  ppl = None
  if docs is not None:
    ppl = perplexity.perplexity(scorer, docs, _STRIDE.value)
    ppl['files'] = list(_TEXT.value)
  out = zero_shot.write_results(
      path, exported, _CKPT.value, results, ppl,
      scoring=dict(always_prefix_eot=_PREFIX.value, allow_split_fallback=_FALLBACK.value),
      instruct=instruct)
  n_params = out['parameters']
  print(zero_shot.markdown_table(out['model'], n_params, results, ppl))
  if instruct:
    print(f"\nheld-out response bits per byte: {instruct['bits_per_byte']:.4f} "
          f"({instruct['items']} items of {instruct['file']}, template {instruct['template']})")
  print(f'\nwrote {path}')


if __name__ == '__main__':
  flags.mark_flag_as_required('checkpoint')
  cli_errors.run(main)
