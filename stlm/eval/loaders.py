"""Benchmark loaders for the original release layouts, from a local directory.

Every loader returns a list of plain dicts (fields normalised per benchmark, see `parse_file`).
Files are found under `data_dir` in the release layout (e.g. `blimp/data/*.jsonl`,
`ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl`, `winogrande_1.1/dev.jsonl`, MMLU's
`data/test/<subject>_test.csv`) or one folder up/down of it. A malformed line raises
`DataError` naming `file:line`; a missing benchmark lists the files that were expected.
When nothing is found locally and a network exists, `tfds_fallback` is tried.
"""

from __future__ import annotations

import csv
import json
import pathlib
import socket
from typing import Callable

from stlm import cli_errors

KNOWN = ('blimp', 'hellaswag', 'arc_easy', 'arc_challenge', 'winogrande', 'mmlu',
         'piqa', 'openbookqa', 'copa', 'lambada')


class DataError(cli_errors.BadInput, ValueError):
  """A benchmark file is missing or malformed; the message says where."""


def check_name(name: str) -> str:
  if name not in KNOWN:
    raise DataError(f'Unknown benchmark {name!r}; known benchmarks: {", ".join(KNOWN)}.')
  return name


# ------------------------------------------------------------------ per-line parsers

def _need(row: dict, keys, where: str) -> None:
  missing = [k for k in keys if k not in row]
  if missing:
    raise DataError(f'{where}: missing field(s) {", ".join(missing)}')


def _field(row: dict) -> str:
  # The release spells one paradigm's field 'syntax/semantics', the others 'syntax_semantics'.
  return str(row.get('field', 'unknown')).replace('/', '_')


def _blimp(row: dict, where: str) -> dict:
  _need(row, ('sentence_good', 'sentence_bad', 'UID'), where)
  return dict(sentence_good=row['sentence_good'], sentence_bad=row['sentence_bad'],
              paradigm=row['UID'], field=_field(row),
              linguistics_term=row.get('linguistics_term', ''), pair_id=row.get('pairID'))


def _arc(row: dict, where: str) -> dict:
  _need(row, ('question', 'answerKey'), where)
  q = row['question']
  if not isinstance(q, dict) or 'stem' not in q or 'choices' not in q:
    raise DataError(f'{where}: question must hold "stem" and "choices"')
  texts = [c['text'] for c in q['choices']]
  labels = [str(c['label']) for c in q['choices']]
  if not 3 <= len(texts) <= 5:
    raise DataError(f'{where}: {len(texts)} choices, expected 3 to 5')
  key = str(row['answerKey'])
  if key not in labels:
    raise DataError(f'{where}: answerKey {key!r} is not one of the labels {labels}')
  return dict(id=row.get('id'), question=q['stem'], choices=texts, labels=labels,
              label=labels.index(key))


def _winogrande(row: dict, where: str) -> dict:
  _need(row, ('sentence', 'option1', 'option2', 'answer'), where)
  if '_' not in row['sentence']:
    raise DataError(f'{where}: sentence has no "_" blank')
  if str(row['answer']) not in ('1', '2'):
    raise DataError(f'{where}: answer {row["answer"]!r} is not "1" or "2" '
                    '(the test split has no answers)')
  return dict(id=row.get('qID'), sentence=row['sentence'], option1=row['option1'],
              option2=row['option2'], label=int(row['answer']) - 1)


def _hellaswag(row: dict, where: str) -> dict:
  _need(row, ('activity_label', 'endings', 'label'), where)
  if 'ctx' not in row and not ('ctx_a' in row and 'ctx_b' in row):
    raise DataError(f'{where}: missing field ctx (or ctx_a and ctx_b)')
  if len(row['endings']) != 4:
    raise DataError(f'{where}: {len(row["endings"])} endings, expected 4')
  if str(row['label']) not in ('0', '1', '2', '3'):
    raise DataError(f'{where}: label {row["label"]!r} is not 0-3 (the test split has none)')
  item = dict(ind=row.get('ind'), activity_label=row['activity_label'],
              ctx=row.get('ctx', ''), endings=list(row['endings']), label=int(row['label']))
  if 'ctx_a' in row and 'ctx_b' in row:
    item.update(ctx_a=row['ctx_a'], ctx_b=row['ctx_b'])
  return item


def _query_choices(row: dict, where: str) -> dict:
  _need(row, ('query', 'choices', 'gold'), where)
  gold = row['gold']
  if not isinstance(gold, int) or not 0 <= gold < len(row['choices']):
    raise DataError(f'{where}: gold {gold!r} is not an index into {len(row["choices"])} choices')
  return dict(query=row['query'], choices=list(row['choices']), gold=gold)


def _lambada(row: dict, where: str) -> dict:
  if 'context' in row and 'continuation' in row:
    return dict(context=row['context'], continuation=row['continuation'])
  if 'text' in row:  # the OpenAI release (lambada_test.jsonl): the last word is the target
    context, sep, word = row['text'].rpartition(' ')
    if not sep:
      raise DataError(f'{where}: text has no space before a last word')
    return dict(context=context, continuation=word)
  raise DataError(f'{where}: missing fields context/continuation (or text)')


_JSONL_PARSERS: dict[str, Callable[[dict, str], dict]] = {
    'blimp': _blimp, 'arc_easy': _arc, 'arc_challenge': _arc, 'winogrande': _winogrande,
    'hellaswag': _hellaswag, 'piqa': _query_choices, 'openbookqa': _query_choices,
    'copa': _query_choices, 'lambada': _lambada,
}


def _read_jsonl(path: pathlib.Path, parse) -> list[dict]:
  items = []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{lineno}'
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{where}: not valid JSON ({e.msg})') from None
      if not isinstance(row, dict):
        raise DataError(f'{where}: expected a JSON object')
      try:
        items.append(parse(row, where))
      except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f'{where}: unexpected layout ({type(e).__name__}: {e})') from None
  return items


_MMLU_HEADER = ['question', 'choice0', 'choice1', 'choice2', 'choice3', 'answer']
_MMLU_ANSWERS = {'A': 0, 'B': 1, 'C': 2, 'D': 3, '0': 0, '1': 1, '2': 2, '3': 3}


def _read_mmlu_csv(path: pathlib.Path) -> list[dict]:
  """Release CSVs have no header and letter answers; a header and 0-3 answers also parse."""
  subject = path.stem.rsplit('_', 1)[0]
  items = []
  with open(path, encoding='utf-8', newline='') as f:
    reader = csv.reader(f)
    start = 1
    for row in reader:
      where = f'{path}:{start}'
      start = reader.line_num + 1
      if not row:
        continue
      if [c.strip().lower() for c in row] == _MMLU_HEADER:
        continue
      if len(row) != 6:
        raise DataError(f'{where}: {len(row)} columns, expected 6 '
                        '(question, 4 choices, answer)')
      answer = row[5].strip()
      if answer not in _MMLU_ANSWERS:
        raise DataError(f'{where}: answer {answer!r} is not A-D or 0-3')
      items.append(dict(subject=subject, question=row[0], choices=row[1:5],
                        label=_MMLU_ANSWERS[answer]))
  return items


def parse_file(name: str, path) -> list[dict]:
  """Items of one benchmark file (any split)."""
  path = pathlib.Path(path)
  if check_name(name) == 'mmlu':
    return _read_mmlu_csv(path)
  return _read_jsonl(path, _JSONL_PARSERS[name])


# ------------------------------------------------------------------ layouts

_ARC_DIRS = ('arc/{s}', 'arc/ARC-V1-Feb2018-2/{s}', 'ARC-V1-Feb2018-2/{s}', '{s}', '.')
_EXTRA = {'piqa': 'piqa.jsonl', 'openbookqa': 'openbook_qa.jsonl', 'copa': 'copa.jsonl',
          'lambada': 'lambada_openai.jsonl'}


def _layout(name: str):
  """(candidate folders, {split: glob}, default split order) of a benchmark."""
  if name == 'blimp':
    return ('blimp/data', 'blimp', 'data', '.'), {'train': '*.jsonl'}, ('train',)
  if name in ('arc_easy', 'arc_challenge'):
    s = 'ARC-Easy' if name == 'arc_easy' else 'ARC-Challenge'
    return (tuple(d.format(s=s) for d in _ARC_DIRS),
            {k: f'{s}-{k.capitalize()}.jsonl' for k in ('test', 'dev', 'train')},
            ('test', 'dev', 'train'))
  if name == 'winogrande':
    splits = ('dev', 'train_xs', 'train_s', 'train_m', 'train_l', 'train_xl', 'train_debiased')
    return (('winogrande/winogrande_1.1', 'winogrande', 'winogrande_1.1', '.'),
            {k: f'{k}.jsonl' for k in splits}, splits)
  if name == 'hellaswag':
    # The release's own name first, so a subset file beside it is not read twice.
    return (('hellaswag', 'hellaswag/data', 'data', '.'),
            {'val': ('hellaswag_val.jsonl', 'hellaswag_val*.jsonl'),
             'train': ('hellaswag_train.jsonl', 'hellaswag_train*.jsonl')}, ('val', 'train'))
  if name == 'mmlu':
    return (('mmlu/data', 'mmlu', 'data', '.'),
            {k: f'{k}/*_{k}.csv' for k in ('test', 'val', 'dev')}, ('test', 'val', 'dev'))
  if name == 'lambada':  # also the OpenAI release file of raw passages
    return (('extra', 'lambada_openai', 'lambada', '.'),
            {'test': (_EXTRA[name], 'lambada_test.jsonl')}, ('test',))
  return ('extra', name, '.'), {'test': _EXTRA[name]}, ('test',)


def _patterns(glob) -> tuple[str, ...]:
  return (glob,) if isinstance(glob, str) else tuple(glob)


def expected_files(name: str, data_dir, split: str | None = None) -> list[str]:
  dirs, globs, order = _layout(check_name(name))
  root = pathlib.Path(data_dir)
  return [str(root / d / g) for s in ((split,) if split else order) for d in dirs
          for g in _patterns(globs[s])[:1]]


def find_files(name: str, data_dir, split: str | None = None) -> tuple[str, list[pathlib.Path]]:
  """(split, files) of the first split (in preference order) found under `data_dir`."""
  dirs, globs, order = _layout(check_name(name))
  if split is not None and split not in globs:
    raise DataError(f'{name} has no split {split!r}; choose one of {", ".join(globs)}.')
  root = pathlib.Path(data_dir)
  for s in ((split,) if split else order):
    for d in dirs:
      for pattern in _patterns(globs[s]):
        files = sorted((root / d).glob(pattern))
        if name == 'blimp':  # the folder may hold other jsonl; paradigm files hold pairs
          files = [f for f in files if _looks_like_blimp(f)]
        if files:
          return s, files
  lines = '\n  '.join(expected_files(name, data_dir, split))
  hint = '' if root.is_dir() else f' (the directory {root} does not exist)'
  raise DataError(f'No {name} data found under {root}{hint}. Expected one of:\n  {lines}')


def _looks_like_blimp(path: pathlib.Path) -> bool:
  with open(path, encoding='utf-8') as f:
    return '"sentence_good"' in f.readline()


def load_split(name: str, data_dir, split: str | None = None) -> tuple[str, list[dict]]:
  """(split, items) of `name`: the default split is test, else validation, else train.

  Local files win; without them, and with a network, tensorflow-datasets is used.
  """
  try:
    split, files = find_files(name, data_dir, split)
  except DataError:
    if split is None and name in _TFDS and network_available():
      return 'tfds:' + _TFDS[name][1], tfds_items(name)
    raise
  items = []
  for f in files:
    items.extend(parse_file(name, f))
  if not items:
    raise DataError(f'{name}: the files {", ".join(map(str, files))} hold no items')
  return split, items


def load(name: str, data_dir, split: str | None = None) -> list[dict]:
  return load_split(name, data_dir, split)[1]


def check_available(name: str, data_dir, split: str | None = None) -> None:
  """Raises DataError (listing the expected files) unless `name` (`split`) can be loaded."""
  try:
    find_files(name, data_dir, split)
  except DataError:
    if split is not None or not (name in _TFDS and network_available()):
      raise


def mmlu_dev(data_dir) -> dict[str, list[dict]]:
  """Dev questions per subject (the few-shot pool)."""
  out: dict[str, list[dict]] = {}
  for item in load('mmlu', data_dir, 'dev'):
    out.setdefault(item['subject'], []).append(item)
  return out


# ------------------------------------------------------------------ tensorflow-datasets

# tfds name, split, and a converter of one record to the release's row layout (so the same
# parsers validate it). MMLU, PIQA, OpenBookQA, COPA and LAMBADA are read from files only.
_TFDS = {
    'blimp': ('blimp', 'train'),
    'hellaswag': ('hellaswag', 'validation'),
    'arc_easy': ('ai2_arc/ARC-Easy', 'test'),
    'arc_challenge': ('ai2_arc/ARC-Challenge', 'test'),
    'winogrande': ('winogrande', 'validation'),
}


def network_available(host: str = 'storage.googleapis.com', timeout: float = 2.0) -> bool:
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def _s(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def _tfds_row(name: str, rec: dict, features) -> dict:
  if name == 'blimp':
    return {k: _s(rec[k]) for k in ('sentence_good', 'sentence_bad', 'field',
                                    'linguistics_term', 'UID')}
  if name == 'hellaswag':
    return dict(activity_label=_s(rec['activity_label']), ctx=_s(rec['context']),
                endings=[_s(e) for e in rec['endings']], label=int(rec['label']))
  if name == 'winogrande':
    return dict(sentence=_s(rec['sentence']), option1=_s(rec['option1']),
                option2=_s(rec['option2']), answer=str(int(rec['label']) + 1))
  names = features['choices']['label'].names  # ARC: ClassLabel ids back to 'A'.. / '1'..
  choices = [dict(text=_s(t), label=names[int(l)])
             for t, l in zip(rec['choices']['text'], rec['choices']['label'])]
  return dict(id=_s(rec['id']), question=dict(stem=_s(rec['question']), choices=choices),
              answerKey=names[int(rec['answerKey'])])


def tfds_items(name: str, tfds_data_dir: str | None = None) -> list[dict]:
  """Items downloaded and prepared by tensorflow-datasets (ArrayRecord, no TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_name, split = _TFDS[name]
  if name == 'blimp':  # one tfds config per paradigm
    configs = [c.name for c in tfds.builder_cls('blimp').BUILDER_CONFIGS]
    names = [f'blimp/{c}' for c in configs]
  else:
    names = [tfds_name]
  items = []
  for n in names:
    builder = tfds.builder(n, data_dir=tfds_data_dir, file_format='array_record')
    builder.download_and_prepare()
    parse = _JSONL_PARSERS[name]
    for i, rec in enumerate(builder.as_data_source(split=split)):
      items.append(parse(_tfds_row(name, rec, builder.info.features), f'tfds:{n}[{split}]#{i}'))
  return items
