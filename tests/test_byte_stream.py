"""Byte-pool v2 stream layout: windows never split or drop a chunk, text round-trips exactly,
grain packing keeps examples whole, and the train iterator resumes exactly."""

import itertools

import numpy as np
import pytest

from stlm import config as config_lib
from stlm import tokenizers
from stlm.data import byte_stream
from stlm.data import chunking
from stlm.models import factory
from stlm.data import pipeline

GPT2 = tokenizers.GPT2Tokenizer()
TEXTS = ['', 'a', 'Hello, world! ' * 30, '日本語のテキスト ' * 9, '👩‍👩‍👧 emoji 🙂',
         '\t\n\r\x00 controls', '-' * 70 + ' ' * 40 + 'end']


class WordTokenizer:
  """Boundaries at spaces only: long 'tokens' without needing a real vocabulary."""

  def split_bytes(self, data):
    out, start = [], 0
    for i in range(1, len(data)):
      if data[i:i + 1] == b' ':
        out.append(data[start:i])
        start = i
    return out + ([data[start:]] if data else [])


def _symbol_chunks(ids, starts):
  bounds = np.append(np.flatnonzero(starts), len(ids))
  return [ids[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize('max_len,stream', [(4, 0), (16, 9), (64, 40)])
@pytest.mark.parametrize('tok', [GPT2, WordTokenizer()], ids=['gpt2', 'words'])
def test_windows_cover_every_chunk_whole_and_round_trip(max_len, stream, tok):
  f = byte_stream.StreamFeaturizer(tok, max_len, 8, stream)
  for text in TEXTS + ['a ' + 'x' * 37 + ' b']:
    data = text.encode()
    chunks = chunking.chunk_bytes(data, tok, 8)
    examples = f.document(text)
    if not chunks:
      assert examples == []
      continue
    want = [[chunking.EOT]] + [list(np.frombuffer(c, np.uint8) + 3) + [chunking.END_OF_CHUNK]
                               for c in chunks] + [[chunking.EOT]]
    got_in, got_tgt, nbytes = [], [], []
    for ex in examples:
      n = len(ex['loss_mask'])
      assert 1 <= n <= max_len
      assert len(ex['inputs']) <= f.stream_len and len(ex['targets']) <= f.stream_len
      ins = _symbol_chunks(ex['inputs'], ex['inputs_chunk_start'])
      tgts = _symbol_chunks(ex['targets'], ex['targets_chunk_start'])
      assert len(ins) == len(tgts) == n   # as many chunks as targets, none split
      got_in += ins
      got_tgt += tgts
      nbytes += ex['target_bytes'].tolist()
    assert got_in == want[:-1] and got_tgt == want[1:]   # every chunk once, in order
    assert nbytes == [len(c) for c in chunks] + [0]
    assert all(len(c) <= 8 for c in chunks)              # long tokens split, never cut
    assert byte_stream.stream_to_bytes(np.concatenate([e['inputs'] for e in examples])) == data


def test_pair_masks_the_continuation():
  f = byte_stream.StreamFeaturizer(GPT2, 64, 16)
  n_ctx, n_cont = len(f.chunks('The cat sat on')), len(f.chunks(' the mat'))
  # Harness convention (default): no end-of-text before a non-empty context, so the first
  # context chunk is an input only.
  example, mask = f.pair('The cat sat on', ' the mat')
  assert mask.tolist() == [False] * (n_ctx - 1) + [True] * n_cont
  assert byte_stream.stream_to_bytes(example['targets']) == b' cat sat on the mat'
  # The old convention: end-of-text before every context, so every context chunk is a target.
  example, mask = f.pair('The cat sat on', ' the mat', always_prefix_eot=True)
  assert mask.tolist() == [False] * n_ctx + [True] * n_cont
  assert byte_stream.stream_to_bytes(example['targets']) == b'The cat sat on the mat'
  tgts = _symbol_chunks(example['targets'], example['targets_chunk_start'])
  assert byte_stream.stream_to_bytes(np.concatenate(
      [t for t, m in zip(tgts, mask) if m])) == b' the mat'
  # An empty context still gets the prefix token: the continuation's first chunk is a target.
  example, mask = f.pair('', 'hello')
  assert mask.all() and byte_stream.stream_to_bytes(example['targets']) == b'hello'


def test_stream_must_hold_a_chunk():
  with pytest.raises(ValueError, match='stream_len'):
    byte_stream.StreamFeaturizer(GPT2, 8, 16, 10)


def _texts(n=40):
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'δέλτα', '中文', '😀', 'x', 'supercalifragilistic']
  return [f'doc{i}: ' + ' '.join(rng.choice(words, rng.integers(1, 40))) for i in range(n)]


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp('stream')
  (root / 'corpus').mkdir()
  (root / 'corpus' / 'docs.txt').write_text('<|endoftext|>'.join(_texts()), encoding='utf-8')
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.kind = 'byte_pool'
  c.model.max_len = 24
  c.model.byte_pool.update(version='v2', max_bytes_per_chunk=8, stream_len=80)
  c.train.batch_size = 3
  c.data.update(source='local', path=str(root / 'corpus'), val_fraction=0.25,
                shuffle_buffer=8, data_dir=str(root / 'tfds'))
  return c


def _row_examples(batch):
  """Every packed segment of every row, as the tuple of its example arrays."""
  out = []
  for r in range(batch['segment_ids'].shape[0]):
    for s in range(1, batch['segment_ids'][r].max() + 1):
      c = batch['segment_ids'][r] == s
      i = batch['inputs_segment_ids'][r] == s
      t = batch['targets_segment_ids'][r] == s
      # Each example's arrays are contiguous, chunk level and streams alike.
      for m in (c, i, t):
        idx = np.flatnonzero(m)
        assert (np.diff(idx) == 1).all()
      out.append((tuple(batch['inputs'][r][i]), tuple(batch['inputs_chunk_start'][r][i]),
                  tuple(batch['targets'][r][t]), tuple(batch['targets_chunk_start'][r][t]),
                  tuple(batch['target_bytes'][r][c])))
      assert batch['inputs_chunk_start'][r][i].sum() == c.sum()  # chunk ids line up
  return out


def test_packing_never_splits_or_drops_and_resumes(cfg):
  f = factory.make_featurizer(cfg, GPT2)
  assert isinstance(f, byte_stream.StreamFeaturizer)
  ev = list(pipeline.make_eval_iter(cfg, f, 'validation'))
  docs = pipeline.document_dataset(cfg, 'validation')
  from stlm.data import tfds_builders  # pylint: disable=g-import-not-at-top
  want = [(tuple(e['inputs']), tuple(e['inputs_chunk_start']), tuple(e['targets']),
           tuple(e['targets_chunk_start']), tuple(e['target_bytes']))
          for i in range(len(docs)) for e in f.document(tfds_builders.record_text(docs[i]))]
  got = [x for b in ev for x in _row_examples(b)]
  assert sorted(got) == sorted(want)    # every example exactly once, whole
  for b in ev:
    assert b['inputs'].shape == (3, f.stream_len) and b['segment_ids'].shape == (3, 24)

  it = pipeline.make_train_iter(cfg, f, 'train')
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it2 = pipeline.make_train_iter(cfg, f, 'train')
  it2.set_state(state)
  for a, b in zip(expected, itertools.islice(it2, 3)):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
