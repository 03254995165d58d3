"""Token overlap between a task's texts and a pretraining subset.

  python -m stlm.classify.overlap --checkpoint=<export> --task=agnews --data_dir=<dir>
      [--corpus=<dir of .txt/.jsonl>] [--max_docs=N]

Reports the fraction of the task's token TYPES (distinct ids) and OCCURRENCES (every token)
that also occur in the pretraining subset, under the export's tokenizer. The subset defaults
to the export's own config (data.path and data.max_train_docs, train split by document as
the trainer splits it).
"""

from __future__ import annotations

import collections



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
  if not counts:
    raise ValueError('the task texts have no tokens')
  in_types = [i for i in counts if i in seen]
  occ = sum(counts[i] for i in in_types)
  total = sum(counts.values())
  return {'types': len(in_types) / len(counts), 'occurrences': occ / total,
          'task_types': len(counts), 'task_tokens': total, 'corpus_types': len(seen),
          'corpus_tokens': corpus_tokens}


def pretraining_texts(config, max_docs: int | None = None):
  """The train-split documents the trainer would read for `config` (first max_docs)."""
  from stlm.data import pipeline  # pylint: disable=g-import-not-at-top
  from stlm.data import tfds_builders  # pylint: disable=g-import-not-at-top
  tfds_builders.prepare(config.data.source, config.data)
  docs = pipeline.document_dataset(config, 'train')
  limit = max_docs if max_docs is not None else int(config.data.get('max_train_docs', 0) or 0)
  n = len(docs) if limit <= 0 else min(limit, len(docs))
  return [tfds_builders.record_text(docs[i]) for i in range(n)]


