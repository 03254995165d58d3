"""grain pipelines: documents -> featurized examples -> packed rows -> batches.

per source: documents (tfds ArrayRecord) -> MapDataset -> shard by process -> shuffle ->
repeat -> featurize (threads) -> flatten to examples; then [weighted mix of examples] ->
window shuffle -> first-fit pack -> batch. Eval reads each source once, in order. With
`data.phases` (stlm/data/phases.py) each phase is such a pipeline over its own sources, read
in turn by `PhasedIterator`.

Iterators are grain `DatasetIterator`s: `it.get_state()` is a JSON-serializable dict and
`it.set_state(state)` resumes exactly where it was (grain re-reads from the last document
the packer had not fully emitted), so a restored run yields the same next batch.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import grain
import numpy as np

from stlm.data import phases
from stlm.data import tfds_builders

EXAMPLE_KEYS = ('inputs', 'targets', 'loss_mask', 'target_bytes')
BATCH_KEYS = EXAMPLE_KEYS + ('segment_ids', 'positions')


class _Featurize(grain.transforms.Map):
  """Record -> list of examples of one document (runs in grain's read threads)."""

  def __init__(self, featurizer):
    self._featurizer = featurizer

  def map(self, record):
    return self._featurizer.document(tfds_builders.record_text(record))


class _Flatten(grain.experimental.FlatMapTransform):
  """A document's examples, one by one (grain keeps the index within the document)."""

  max_fan_out = 1 << 20  # Only used by MapDataset flat maps; the iterator has no cap.

  def flat_map(self, examples):
    return examples


class _ToBatchRow(grain.transforms.Map):
  """grain's packed names (`inputs_segment_ids`, ...) -> the batch layout of the docs."""

  def map(self, packed):
    row = {k: packed[k] for k in EXAMPLE_KEYS}
    row['segment_ids'] = packed['inputs_segment_ids']
    row['positions'] = packed['inputs_positions']
    return row


def per_process_batch(config, process_count: int) -> int:
  batch = int(config.train.batch_size)
  if batch % process_count:
    raise ValueError(f'train.batch_size={batch} is not divisible by the {process_count} '
                     'data-loading processes.')
  return batch // process_count


def _source_datasets(config, split: str, process_index: int, process_count: int,
                     sources: dict | None = None) -> list[tuple[grain.MapDataset, float]]:
  """(documents of this process, weight) per source: disjoint strided parts.

  `sources`: {name: (random-access source, weight)}; default every source the run reads.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} outside [0, {process_count})')
  if sources is None:
    sources = tfds_builders.document_sources(config.data, split)
  out = []
  limit = int(config.data.get('max_train_docs', 0) or 0) if split == 'train' else 0
  for name, (source, weight) in sources.items():
    ds = grain.MapDataset.source(source)
    if limit > 0:  # a pretraining subset: the first N documents, before sharding
      ds = ds[:limit]
    ds = ds[process_index::process_count]
    if len(ds) == 0:  # pylint: disable=g-explicit-length-test
      raise ValueError(f'{name} {split} split has {len(source)} documents: too few for '
                       f'{process_count} processes')
    out.append((ds, weight))
  return out


def document_dataset(config, split: str, *, process_index: int = 0,
                     process_count: int = 1) -> grain.MapDataset:
  """This process's records of `split`, every source once, in order (what eval reads)."""
  parts = [ds for ds, _ in _source_datasets(config, split, process_index, process_count)]
  return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


def _examples(docs: grain.MapDataset, featurizer, config) -> grain.IterDataset:
  threads = max(1, min(4, int(config.data.get('num_threads', 2))))
  ds = docs.map(_Featurize(featurizer)).to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=16))
  return grain.experimental.FlatMapIterDataset(ds, _Flatten())


class _FeaturizerRow(grain.transforms.Map):
  """Packed features -> batch row by the featurizer's own `to_batch_row` (other layouts)."""

  def __init__(self, featurizer):
    self._featurizer = featurizer

  def map(self, packed):
    return self._featurizer.to_batch_row(packed)


def _pack(examples: grain.IterDataset, config, bins: int, *, shuffle: bool,
          featurizer=None, seed: int | None = None) -> grain.IterDataset:
  # A featurizer with its own layout (byte-pool v2: chunk keys of max_len, byte-stream keys
  # of stream_len) names each key's row length; one example always goes whole into one row.
  if hasattr(featurizer, 'length_struct'):
    packed = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct=featurizer.length_struct(), num_packing_bins=bins,
        seed=int(config.seed) if seed is None else seed, shuffle_bins=shuffle)
    return packed.map(_FeaturizerRow(featurizer))
  max_len = int(config.model.max_len)
  packed = grain.experimental.FirstFitPackIterDataset(
      examples, length_struct={k: max_len for k in EXAMPLE_KEYS},
      num_packing_bins=bins, seed=int(config.seed) if seed is None else seed,
      shuffle_bins=shuffle)
  return packed.map(_ToBatchRow())


# Phase i shuffles with seed + i * this prime (phase 0: exactly the unphased pipeline's seed).
_PHASE_SEED_STRIDE = 104729


def make_train_iter(config, featurizer, split: str = 'train', *, process_index: int = 0,
                    process_count: int = 1) -> grain.DatasetIterator:
  """Endless shuffled batches of packed rows for this process (epochs reshuffled by seed).

  With `data.phases`, each phase's sources in turn: `grad_accum` batches per step.
  """
  specs = phases.parse(config.data.get('phases', '') or '')
  if not specs:
    return _train_iter(config, featurizer, _source_datasets(
        config, split, process_index, process_count), int(config.seed), process_count)

  def phase_iter(i: int) -> grain.DatasetIterator:
    sources = tfds_builders.phase_document_sources(config.data, specs[i], split)
    # Each phase its own shuffle: a source read again in a later phase is not replayed
    # in the order it was read before.
    seed = (int(config.seed) + _PHASE_SEED_STRIDE * i) % 2**31
    return _train_iter(config, featurizer, _source_datasets(
        config, split, process_index, process_count, sources), seed, process_count)

  per_step = int(config.train.grad_accum)
  ends = [None if p.end is None else p.end * per_step for p in specs]
  return PhasedIterator(phase_iter, ends)


def _train_iter(config, featurizer, sources: list[tuple[grain.MapDataset, float]], seed: int,
                process_count: int) -> grain.DatasetIterator:
  batch = per_process_batch(config, process_count)
  parts, weights = [], []
  for i, (docs, weight) in enumerate(sources):
    # Each source reshuffles every epoch on its own, so a small source never caps a big one.
    docs = docs.shuffle(seed=(seed + 7919 * i) % 2**32).repeat()
    parts.append(_examples(docs, featurizer, config))
    weights.append(weight)
  # Mixed per example (a window of <= max_len tokens), so weights are close to token shares.
  ds = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, weights)
  if int(config.data.shuffle_buffer) > 1:
    # Windows of one long document arrive together; mix them with other documents'.
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=int(config.data.shuffle_buffer), seed=seed + 1)
  ds = _pack(ds, config, bins=batch, shuffle=True, featurizer=featurizer, seed=seed)
  ds = ds.batch(batch, drop_remainder=True)
  if int(config.data.num_workers) > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(config.data.num_workers)))
  return iter(ds)


class PhasedIterator(grain.DatasetIterator):
  """The batches of each phase in turn: phase i's own iterator until `ends[i]` batches have
  been drawn in all, then phase i + 1's from its start (`ends[-1]` None: the last runs on).

  Its state is the phase, the batches drawn so far and the phase iterator's own position,
  so a restore lands inside a phase or right at a boundary exactly where it was.
  """

  def __init__(self, make_phase_iter, ends: list[int | None]):
    super().__init__()
    self._make, self._ends = make_phase_iter, list(ends)
    self._phase, self._drawn, self._it = 0, 0, None

  @property
  def phase(self) -> int:
    """The phase of the next batch."""
    self._advance()
    return self._phase

  def _advance(self) -> None:
    while self._ends[self._phase] is not None and self._drawn >= self._ends[self._phase]:
      self._phase += 1
      self._replace(None)

  def _replace(self, it) -> None:
    if self._it is not None:
      self._it.close()
    self._it = it

  def _current(self) -> grain.DatasetIterator:
    self._advance()
    if self._it is None:
      self._it = self._make(self._phase)
    return self._it

  def __next__(self):
    batch = next(self._current())
    self._drawn += 1
    return batch

  def get_state(self):
    position = self._current().get_state()
    return {'phase': self._phase, 'drawn': self._drawn, 'position': position}

  def set_state(self, state):
    if not 0 <= state['phase'] < len(self._ends):
      raise ValueError(f'iterator state of phase {state["phase"]}, but the run has '
                       f'{len(self._ends)} phases')
    self._phase, self._drawn = int(state['phase']), int(state['drawn'])
    self._replace(self._make(self._phase))
    self._it.set_state(state['position'])

  def start_prefetch(self) -> None:
    self._current().start_prefetch()

  def close(self) -> None:
    self._replace(None)
    super().close()


def _pad_batch(batch_size: int):
  def pad(rows):
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    missing = batch_size - len(rows)
    if missing:  # All-zero rows: segment 0 and loss_mask 0, so they count for nothing.
      out = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
             for k, v in out.items()}
    return out
  return pad


class _FixedCount(grain.DatasetIterator):
  """Exactly `n` batches: cut after n, or add fully masked ones so all processes agree."""

  def __init__(self, parent: grain.DatasetIterator, n: int, empty: dict[str, np.ndarray]):
    super().__init__(parent)
    self._n, self._empty, self._count = n, empty, 0

  def __next__(self):
    if self._count >= self._n:
      raise StopIteration
    self._count += 1
    try:
      return next(self._parent)
    except StopIteration:
      return {k: v.copy() for k, v in self._empty.items()}

  def get_state(self):
    return {'parent': self._parent.get_state(), 'count': self._count}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._count = state['count']


def _empty_batch(featurizer, batch: int, max_len: int) -> dict[str, np.ndarray]:
  if hasattr(featurizer, 'empty_batch'):
    return featurizer.empty_batch(batch)
  # Trailing dims and dtypes come from a real example (e.g. [L, C] for byte_pool).
  example = featurizer.document('x')[0]
  out = {k: np.zeros((batch, max_len) + example[k].shape[1:], example[k].dtype)
         for k in EXAMPLE_KEYS}
  out['segment_ids'] = np.zeros((batch, max_len), np.int32)
  out['positions'] = np.zeros((batch, max_len), np.int32)
  return out


def make_eval_iter(config, featurizer, split: str = 'validation', *, process_index: int = 0,
                   process_count: int = 1, batch_size: int | None = None,
                   num_batches: int | None = None) -> grain.DatasetIterator:
  """One deterministic pass over `split`: every target once; the last batch is padded.

  With `num_batches`, exactly that many batches (cut, or padded with fully masked
  batches), so processes with shards of different sizes run the same number of steps.
  """
  batch = batch_size or per_process_batch(config, process_count)
  docs = document_dataset(config, split, process_index=process_index,
                          process_count=process_count)
  ds = _pack(_examples(docs, featurizer, config), config, bins=batch, shuffle=False,
             featurizer=featurizer)
  it = iter(ds.batch(batch, drop_remainder=False, batch_fn=_pad_batch(batch)))
  if num_batches is None:
    return it
  return _FixedCount(it, num_batches, _empty_batch(featurizer, batch, config.model.max_len))


def state_to_json(state: dict[str, Any]) -> str:
  """An iterator state as JSON text (what the trainer can store beside a checkpoint)."""
  return json.dumps(state, sort_keys=True)


def state_from_json(text: str) -> dict[str, Any]:
  return json.loads(text)


def corpus_stats(texts: Iterable[str], tokenizer) -> dict[str, float]:
  """Documents, UTF-8 bytes and tokens of `texts`, and tokens per byte."""
  docs = n_bytes = n_tokens = 0
  for text in texts:
    docs += 1
    n_bytes += len(text.encode('utf-8'))
    n_tokens += len(tokenizer.encode(text))
  return {'documents': docs, 'bytes': n_bytes, 'tokens': n_tokens,
          'tokens_per_byte': n_tokens / max(n_bytes, 1)}
