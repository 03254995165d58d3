"""grain pipelines: packing, determinism, exact resume, process shards, eval coverage."""

import collections
import itertools
import json

import grain
import numpy as np
import pytest

from stlm import config as config_lib
from stlm import tokenizers
from stlm.data import featurize
from stlm.data import pipeline

BYTES = tokenizers.ByteTokenizer()


def _texts(n=60):
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'δέλτα', '中文', '😀', 'x']
  return [f'doc{i}: ' + ' '.join(rng.choice(words, rng.integers(1, 30))) for i in range(n)]


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipe')
  (root / 'corpus').mkdir()
  (root / 'corpus' / 'docs.txt').write_text('<|endoftext|>'.join(_texts()), encoding='utf-8')
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.max_len = 48
  c.train.batch_size = 4
  c.data.source = 'local'
  c.data.path = str(root / 'corpus')
  c.data.val_fraction = 0.25
  c.data.shuffle_buffer = 8
  c.data.data_dir = str(root / 'tfds')
  return c


def _featurizer(c):
  return featurize.TokenFeaturizer(BYTES, c.model.max_len)


def _split_texts(c, split, **kw):
  from stlm.data import tfds_builders  # pylint: disable=g-import-not-at-top
  docs = pipeline.document_dataset(c, split, **kw)
  return [tfds_builders.record_text(docs[i]) for i in range(len(docs))]


def _segments(batch):
  """(inputs, targets, target_bytes) of every segment of every row, as tuples."""
  out = []
  for r in range(batch['segment_ids'].shape[0]):
    seg = batch['segment_ids'][r]
    for s in range(1, seg.max() + 1):
      idx = np.nonzero(seg == s)[0]
      out.append(tuple(tuple(batch[k][r][idx].reshape(len(idx), -1).ravel().tolist())
                       for k in ('inputs', 'targets', 'target_bytes')))
  return out


def _expected(featurizer, texts):
  return [tuple(tuple(e[k].reshape(len(e[k]), -1).ravel().tolist())
                for k in ('inputs', 'targets', 'target_bytes'))
          for t in texts for e in featurizer.document(t)]


def _check_row_layout(batch, batch_size, max_len):
  assert set(batch) == set(pipeline.BATCH_KEYS)
  for k, v in batch.items():
    assert v.shape[:2] == (batch_size, max_len), k
  for r in range(batch_size):
    seg, pos = batch['segment_ids'][r], batch['positions'][r]
    n = int((seg > 0).sum())
    assert (seg[n:] == 0).all(), 'padding only at the end of a row'
    if n:
      assert seg[0] == 1 and (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
    for s in range(1, seg.max() + 1):
      np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
    np.testing.assert_array_equal(batch['loss_mask'][r], (seg > 0).astype(np.float32))
    assert (batch['positions'][r][n:] == 0).all() and (batch['targets'][r][n:] == 0).all()


def test_train_batches_layout_and_no_truncation(cfg):
  f = _featurizer(cfg)
  it = pipeline.make_train_iter(cfg, f, 'train')
  train_texts = _split_texts(cfg, 'train')
  expected = collections.Counter(_expected(f, train_texts))
  seen = collections.Counter()
  for batch in itertools.islice(it, 40):
    _check_row_layout(batch, 4, cfg.model.max_len)
    assert batch['inputs'].dtype == np.int32 and batch['loss_mask'].dtype == np.float32
    seen.update(_segments(batch))
  # Every packed segment is a whole example of a training document ...
  assert set(seen) <= set(expected)
  # ... and 40 batches (> 2 epochs here) show every example of every document.
  assert set(seen) == set(expected)


def test_train_is_deterministic_for_a_seed(cfg):
  f = _featurizer(cfg)
  a = list(itertools.islice(pipeline.make_train_iter(cfg, f), 6))
  b = list(itertools.islice(pipeline.make_train_iter(cfg, f), 6))
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other = cfg.copy_and_resolve_references()
  other.seed = 1
  c = list(itertools.islice(pipeline.make_train_iter(other, f), 6))
  assert any(not np.array_equal(x['targets'], z['targets']) for x, z in zip(a, c))


@pytest.mark.parametrize('skip', [0, 1, pytest.param(5, marks=pytest.mark.slow), pytest.param(13, marks=pytest.mark.slow)])
def test_restore_yields_the_same_next_batches(cfg, skip):
  f = _featurizer(cfg)
  it = pipeline.make_train_iter(cfg, f)
  for _ in range(skip):
    next(it)
  saved = pipeline.state_to_json(it.get_state())
  json.loads(saved)  # plain JSON
  expected = [next(it) for _ in range(6)]
  restored = pipeline.make_train_iter(cfg, f)
  next(restored)  # a different position before restoring must not matter
  restored.set_state(pipeline.state_from_json(saved))
  for want in expected:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_grain_checkpoint_handler_with_orbax(cfg, tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  f = _featurizer(cfg)
  it = pipeline.make_train_iter(cfg, f)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = [next(it) for _ in range(3)]
  restored = pipeline.make_train_iter(cfg, f)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for want in expected:
    np.testing.assert_array_equal(next(restored)['targets'], want['targets'])


def test_process_shards_are_disjoint(cfg):
  all_docs = _split_texts(cfg, 'train')
  shards = [_split_texts(cfg, 'train', process_index=i, process_count=2) for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(all_docs)
  f = _featurizer(cfg)
  per_process = [set(), set()]
  for i in range(2):
    it = pipeline.make_train_iter(cfg, f, process_index=i, process_count=2)
    for batch in itertools.islice(it, 20):
      assert batch['inputs'].shape[0] == 2  # train.batch_size // process_count
      per_process[i].update(_segments(batch))
    assert per_process[i] <= set(_expected(f, shards[i]))
  assert not per_process[0] & per_process[1]
  with pytest.raises(ValueError, match='not divisible'):
    pipeline.make_train_iter(cfg, f, process_index=0, process_count=3)


def test_eval_covers_every_validation_target_once(cfg):
  f = _featurizer(cfg)
  val_texts = _split_texts(cfg, 'validation')
  assert val_texts and not set(val_texts) & set(_split_texts(cfg, 'train'))
  batches = list(pipeline.make_eval_iter(cfg, f))
  seen = collections.Counter()
  for batch in batches:
    _check_row_layout(batch, 4, cfg.model.max_len)
    seen.update(_segments(batch))
  assert seen == collections.Counter(_expected(f, val_texts))
  n_targets = sum(len(t.encode('utf-8')) + 1 for t in val_texts)
  assert sum(b['loss_mask'].sum() for b in batches) == n_targets
  again = list(pipeline.make_eval_iter(cfg, f))
  assert len(again) == len(batches)
  for x, y in zip(batches, again):
    np.testing.assert_array_equal(x['targets'], y['targets'])


def test_eval_pads_the_last_batch_with_masked_rows(cfg):
  f = _featurizer(cfg)
  batches = list(pipeline.make_eval_iter(cfg, f, batch_size=64))
  assert len(batches) == 1 and batches[0]['inputs'].shape == (64, cfg.model.max_len)
  empty = batches[0]['segment_ids'].max(axis=1) == 0
  assert empty.any() and (batches[0]['loss_mask'][empty] == 0).all()


class _TwoColumn:
  """A featurizer with [L, C] inputs/targets, like the byte-pool ChunkFeaturizer."""

  def __init__(self, max_len):
    self._f = featurize.TokenFeaturizer(BYTES, max_len)

  def document(self, text):
    out = []
    for e in self._f.document(text):
      e = dict(e)
      e['inputs'] = np.stack([e['inputs'], e['inputs'] + 1], axis=1)
      e['targets'] = np.stack([e['targets'], e['targets'] + 1], axis=1)
      out.append(e)
    return out


def test_packs_features_with_trailing_dims(cfg):
  f = _TwoColumn(cfg.model.max_len)
  batches = list(pipeline.make_eval_iter(cfg, f))
  seen = collections.Counter()
  for batch in batches:
    assert batch['inputs'].shape == (4, cfg.model.max_len, 2)
    assert batch['segment_ids'].shape == (4, cfg.model.max_len)
    _check_row_layout(batch, 4, cfg.model.max_len)
    seen.update(_segments(batch))
  assert seen == collections.Counter(_expected(f, _split_texts(cfg, 'validation')))


def test_builtin_corpus_with_gpt2(tmp_path):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.data.data_dir = str(tmp_path)
  f = featurize.TokenFeaturizer(tokenizers.GPT2Tokenizer(), c.model.max_len)
  batch = next(pipeline.make_train_iter(c, f))
  assert batch['targets'].shape == (c.train.batch_size, c.model.max_len)
  assert batch['targets'].max() < 50257 and batch['loss_mask'].sum() > 0
  stats = pipeline.corpus_stats(['Hello world'], f.tokenizer)
  assert stats == {'documents': 1, 'bytes': 11, 'tokens': 2, 'tokens_per_byte': 2 / 11}


@pytest.mark.slow
def test_mix_of_sources(cfg):
  c = cfg.copy_and_resolve_references()
  c.data.source = 'mix'
  c.data.mix = {'builtin': 1.0, 'local': 3.0}
  f = featurize.TokenFeaturizer(BYTES, c.model.max_len)
  local = set(_expected(f, _split_texts(cfg, 'train')))
  segs = [s for b in itertools.islice(pipeline.make_train_iter(c, f), 60) for s in _segments(b)]
  from_local = [s for s in segs if s in local]
  assert 0.6 < len(from_local) / len(segs) < 0.9  # weights are shares of examples
  assert set(from_local) == local  # the small source repeats on its own, nothing is capped
  # Evaluation concatenates the sources' validation splits: each target exactly once.
  val_texts = _split_texts(c, 'validation')
  assert set(_split_texts(cfg, 'validation')) < set(val_texts)
  seen = collections.Counter(s for b in pipeline.make_eval_iter(c, f) for s in _segments(b))
  assert seen == collections.Counter(_expected(f, val_texts))


def test_restore_with_a_mix(cfg):
  c = cfg.copy_and_resolve_references()
  c.data.source = 'mix'
  c.data.mix = {'builtin': 1.0, 'local': 2.0}
  f = _featurizer(c)
  it = pipeline.make_train_iter(c, f)
  for _ in range(7):
    next(it)
  saved = pipeline.state_to_json(it.get_state())
  expected = [next(it) for _ in range(4)]
  restored = pipeline.make_train_iter(c, f)
  restored.set_state(pipeline.state_from_json(saved))
  for want in expected:
    np.testing.assert_array_equal(next(restored)['targets'], want['targets'])


def test_eval_fixed_number_of_batches(cfg):
  f = _featurizer(cfg)
  full = list(pipeline.make_eval_iter(cfg, f))
  longer = list(pipeline.make_eval_iter(cfg, f, num_batches=len(full) + 2))
  assert len(longer) == len(full) + 2
  for x, y in zip(full, longer):
    np.testing.assert_array_equal(x['targets'], y['targets'])
  for extra in longer[len(full):]:
    assert extra['loss_mask'].sum() == 0 and extra['inputs'].shape == full[0]['inputs'].shape
    assert {k: v.dtype for k, v in extra.items()} == {k: v.dtype for k, v in full[0].items()}
  it = pipeline.make_eval_iter(cfg, f, num_batches=1)
  assert len(list(it)) == 1
