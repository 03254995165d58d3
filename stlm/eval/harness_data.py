"""Local datasets for the lm-evaluation-harness task files in `harness_tasks/` (no network).

Each task names `custom_dataset: !function ...harness_data.<benchmark>`; the harness calls
it with the task's `metadata` (where `data_dir` arrives from `--metadata` or the
`stlm.eval.harness` CLI's `--data_dir`, else `$STLM_BENCHMARK_DIR`) and gets the rows this
project's loaders read from the release layout, in the field layout of the Hugging Face
dataset that the harness's own task reads (so the harness's own prompt templates apply).
"""

from __future__ import annotations

import os

from stlm.eval import loaders

ENV_DATA_DIR = 'STLM_BENCHMARK_DIR'


def data_dir_of(metadata: dict) -> str:
  d = metadata.get('data_dir') or os.environ.get(ENV_DATA_DIR)
  if not d:
    raise loaders.DataError('the stlm harness tasks need the benchmark directory: pass '
                            '--data_dir to python -m stlm.eval.harness, '
                            '--metadata=\'{"data_dir": "<dir>"}\' to lm_eval, or set '
                            f'${ENV_DATA_DIR}')
  return d


def rows(name: str, item: dict) -> dict:
  """One loaded item in the field layout of the harness's own dataset for `name`."""
  if name in ('arc_easy', 'arc_challenge'):
    return dict(id=item['id'] or '', question=item['question'],
                choices=dict(text=list(item['choices']), label=list(item['labels'])),
                answerKey=item['labels'][item['label']])
  if name == 'hellaswag':
    # Files with only `ctx` give it as ctx_a; the harness's process_docs then builds
    # preprocess(activity_label + ': ' + ctx + ' '), whose strip() drops the extra space.
    return dict(activity_label=item['activity_label'], ctx_a=item.get('ctx_a', item['ctx']),
                ctx_b=item.get('ctx_b', ''), ctx=item['ctx'], endings=list(item['endings']),
                label=str(item['label']))
  if name == 'winogrande':
    return dict(sentence=item['sentence'], option1=item['option1'], option2=item['option2'],
                answer=str(item['label'] + 1))
  if name == 'blimp':
    return dict(sentence_good=item['sentence_good'], sentence_bad=item['sentence_bad'],
                UID=item['paradigm'])
  if name == 'mmlu':
    return dict(question=item['question'], subject=item['subject'],
                choices=list(item['choices']), answer=int(item['label']))
  if name in ('piqa', 'openbookqa', 'copa'):
    return dict(query=item['query'], choices=list(item['choices']), gold=int(item['gold']))
  raise loaders.DataError(f'no harness task for {name}')


def dataset(name: str, split: str | None = None, **metadata):
  """DatasetDict {split: rows} of one benchmark split (default: the loaders' preference)."""
  import datasets  # pylint: disable=g-import-not-at-top
  used, items = loaders.load_split(name, data_dir_of(metadata), split)
  return datasets.DatasetDict(
      {used: datasets.Dataset.from_list([rows(name, it) for it in items])})


def _task(name):
  def build(**kwargs):
    return dataset(name, kwargs.pop('split', None), **kwargs)
  build.__name__ = name
  return build


blimp = _task('blimp')
hellaswag = _task('hellaswag')
arc_easy = _task('arc_easy')
arc_challenge = _task('arc_challenge')
winogrande = _task('winogrande')
mmlu = _task('mmlu')
piqa = _task('piqa')
