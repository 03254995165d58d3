"""Token and word overlap between a task's texts and a pretraining subset.

  python -m stlm.classify.overlap --checkpoint=<export> --task=agnews --data_dir=<dir>
      [--corpus=<dir of .txt/.jsonl>] [--max_docs=N]

Reports the fraction of the task's token TYPES (distinct ids) and OCCURRENCES (every token)
that also occur in the pretraining subset, under the export's tokenizer, and the same two
fractions for WORDS (lower-cased runs of letters and digits), which no tokenizer decides: a
small subword vocabulary is seen whole by almost any English corpus, words are not. The
subset defaults to the export's own config (data.path and data.max_train_docs, train split
by document as the trainer splits it).
"""

from __future__ import annotations

import collections
import re

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
  """Lower-cased runs of letters and digits: the tokenizer-free unit of word overlap."""
  return _WORD.findall(text.lower())


def _fractions(task_counts: collections.Counter, seen: set) -> tuple[float, float]:
  if not task_counts:
    raise ValueError('the task texts have no tokens')
  in_types = [i for i in task_counts if i in seen]
  occ = sum(task_counts[i] for i in in_types)
  return len(in_types) / len(task_counts), occ / sum(task_counts.values())


def word_overlap(task_texts, corpus_texts) -> dict:
  """{'types': fraction of the task's word types seen in the corpus, 'occurrences': ...}."""
  seen = set()
  for t in corpus_texts:
    seen.update(words(t))
  counts = collections.Counter()
  for t in task_texts:
    counts.update(words(t))
  types, occurrences = _fractions(counts, seen)
  return {'types': types, 'occurrences': occurrences, 'task_types': len(counts),
          'corpus_types': len(seen)}


def token_overlap(tokenizer, task_texts, corpus_texts) -> dict:
  """{'types': fraction of task token types seen in the corpus, 'occurrences': ..., counts}."""
  seen = set()
  corpus_tokens = 0
  for t in corpus_texts:
    ids = tokenizer.encode(t)
    corpus_tokens += len(ids)
    seen.update(ids)
  counts = collections.Counter()
  for t in task_texts:
    counts.update(tokenizer.encode(t))
  types, occurrences = _fractions(counts, seen)
  return {'types': types, 'occurrences': occurrences, 'task_types': len(counts),
          'task_tokens': sum(counts.values()), 'corpus_types': len(seen),
          'corpus_tokens': corpus_tokens}


def pretraining_texts(config, max_docs: int | None = None):
  """The train-split documents the trainer would read for `config` (first max_docs)."""
  from stlm.data import pipeline  # pylint: disable=g-import-not-at-top
  from stlm.data import tfds_builders  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  limit = max_docs if max_docs is not None else int(config.data.get('max_train_docs', 0) or 0)
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.max_train_docs = 0       # the slice below is the only limit
  tfds_builders.prepare(config.data.source, config.data)
  docs = pipeline.document_dataset(config, 'train')
  n = len(docs) if limit <= 0 else min(limit, len(docs))
  return [tfds_builders.record_text(docs[i]) for i in range(n)]



def task_texts(task: str, data_dir: str, train_file: str = '', test_file: str = '') -> list[str]:
  """Every text of the task's train and test files (FewRel: every sentence of the file)."""
  from stlm.data import classification as cd  # pylint: disable=g-import-not-at-top
  if task == 'fewrel':
    path = test_file or cd.find_file('fewrel', data_dir, cd.TEST_FILES['fewrel'])
    if not path:
      raise FileNotFoundError(f'no FewRel file in {data_dir!r}; give --test_file')
    return [' '.join(x.tokens) for v in cd.load_fewrel(path).values() for x in v]
  texts = []
  for given, names in ((train_file, cd.TRAIN_FILES[task]), (test_file, cd.TEST_FILES[task])):
    path = given or cd.find_file(task, data_dir, names)
    if path:
      texts += cd.load_task_file(task, path).texts
  if not texts:
    raise FileNotFoundError(f'no {task} files in {data_dir!r}')
  return texts


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from stlm import export as export_lib  # pylint: disable=g-import-not-at-top
  from stlm import tokenizers  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  config = export_lib.load_config(f.checkpoint)
  if f.corpus:
    config.data.source, config.data.path = 'local', f.corpus
  tok = tokenizers.build_tokenizer(config.tokenizer)
  corpus = pretraining_texts(config, f.max_docs if f.max_docs >= 0 else None)
  task = task_texts(f.task, f.data_dir, f.train_file, f.test_file)
  rec = token_overlap(tok, task, corpus)
  rec.update(task=f.task, checkpoint=f.checkpoint, corpus_docs=len(corpus),
             words=word_overlap(task, corpus))
  print(f'{f.task}: {rec["types"]:.3f} of token types and {rec["occurrences"]:.3f} of token '
        f'occurrences occur in the pretraining subset ({len(corpus)} documents); words: '
        f'{rec["words"]["types"]:.3f} of types, {rec["words"]["occurrences"]:.3f} of '
        'occurrences')
  if f.output:
    with open(f.output, 'w', encoding='utf-8') as fh:
      json.dump(rec, fh, indent=2)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.DEFINE_string('checkpoint', None, 'Export whose tokenizer and pretraining data count.')
  _flags.DEFINE_enum('task', None, ['agnews', 'dbpedia', 'fewrel'], 'Task.')
  _flags.DEFINE_string('data_dir', '', 'Directory of the task in its release layout.')
  _flags.DEFINE_string('train_file', '', 'Train file (default: the documented name).')
  _flags.DEFINE_string('test_file', '', 'Test file (default: the documented name).')
  _flags.DEFINE_string('corpus', '', 'Pretraining directory (default: the export\'s data.path).')
  _flags.DEFINE_integer('max_docs', -1, 'First N train documents (-1: the export\'s '
                        'data.max_train_docs; 0: all).')
  _flags.DEFINE_string('output', '', 'JSON file for the result.')
  _flags.mark_flags_as_required(['checkpoint', 'task'])
  app.run(main)
