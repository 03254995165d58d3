"""python -m stlm.eval --checkpoint=<workdir>/export --benchmarks=blimp,... --data_dir=<dir>.

Writes results.json next to the checkpoint and prints the paper's Table 2 as Markdown.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from stlm.data import corpus
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
_OUT = flags.DEFINE_string('output', None, 'results.json path (default: beside --checkpoint).')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep Orbax's restore chatter off the table
  try:
    specs = zero_shot.parse_specs(_BENCH.value)
    if specs and not _DATA.value:
      raise loaders.DataError('--data_dir is required to run benchmarks')
    for n, split in specs:  # fail before loading the model if a benchmark's files are missing
      try:
        loaders.check_available(n, _DATA.value, None if _FALLBACK.value else split)
      except loaders.DataError as e:
        if split is None:
          raise
        raise loaders.DataError(f'{e}\n(split {split!r} was requested by --benchmarks={n}:'
                                f'{split}; --allow_split_fallback takes the first split '
                                'present instead)') from None
    docs = perplexity.read_documents(_TEXT.value) if _TEXT.value else None
    exported = zero_shot.open_checkpoint(_CKPT.value)
    window = exported.config.model.max_len
    if _STRIDE.value is not None and not 1 <= _STRIDE.value <= window:
      raise loaders.DataError(f'--stride={_STRIDE.value} must be in 1..{window} (the window)')
    scorer = zero_shot.make_scorer(exported, _BATCH.value, progress=True, verbose=True,
                                    always_prefix_eot=_PREFIX.value,
                                    score_fraction=_FRACTION.value)
    results = zero_shot.run_benchmarks(exported, _BENCH.value, _DATA.value, _LIMIT.value,
                                        seed=_SEED.value, mmlu_shots=_SHOTS.value,
                                        scorer=scorer, allow_split_fallback=_FALLBACK.value)
    ppl = None
    if docs is not None:
      ppl = perplexity.perplexity(scorer, docs, _STRIDE.value)
      ppl['files'] = list(_TEXT.value)
  except (loaders.DataError, corpus.CorpusError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  path = _OUT.value or os.path.join(os.path.dirname(os.path.abspath(_CKPT.value)),
                                    'results.json')
  out = zero_shot.write_results(
      path, exported, _CKPT.value, results, ppl,
      scoring=dict(always_prefix_eot=_PREFIX.value, allow_split_fallback=_FALLBACK.value))
  n_params = out['parameters']
  print(zero_shot.markdown_table(out['model'], n_params, results, ppl))
  print(f'\nwrote {path}')


if __name__ == '__main__':
  flags.mark_flag_as_required('checkpoint')
  app.run(main)
