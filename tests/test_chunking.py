"""Chunking: exact byte round trips, BPE boundaries kept, featurizer layout like the baseline's."""

import numpy as np
import pytest

from stlm import tokenizers
from stlm.data import chunking
from stlm.data import featurize
from stlm.models import factory

SCRIPTS = ['', 'a', 'Hello, world!', '日本語のテキスト', 'مرحبا بالعالم', 'Привет, мир',
           'नमस्ते दुनिया', '👩‍👩‍👧 emoji 🙂', 'e\u0301 combining', '\t\n\r\x00 controls']


@pytest.fixture(scope='module')
def gpt2():
  return tokenizers.GPT2Tokenizer()


class WordTokenizer:
  """Boundaries at spaces only: long 'tokens' without needing a real vocabulary."""

  def split_bytes(self, data):
    out, start = [], 0
    for i in range(1, len(data)):
      if data[i:i + 1] == b' ':
        out.append(data[start:i])
        start = i
    return out + ([data[start:]] if data else [])


def _check_round_trip(data, tok, max_bytes):
  chunks = chunking.chunk_bytes(data, tok, max_bytes)
  assert b''.join(chunks) == data
  assert all(1 <= len(c) <= max_bytes for c in chunks)
  ids, lengths = chunking.encode_chunks(chunks, chunking.chunk_width(max_bytes),
                                        end_of_chunk=True)
  assert chunking.chunks_to_bytes(ids) == data
  np.testing.assert_array_equal(lengths, [len(c) for c in chunks])
  for row, c in zip(ids, chunks):
    assert chunking.decode_chunk_ids(row) == (c, False)
  return chunks


@pytest.mark.parametrize('max_bytes', [1, 3, 16])
def test_round_trip_random_bytes(gpt2, max_bytes):
  rng = np.random.default_rng(max_bytes)
  for tok in (gpt2, tokenizers.ByteTokenizer(), WordTokenizer()):
    for n in (0, 1, 2, 7, 64, 300):
      data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # mostly invalid UTF-8
      _check_round_trip(data, tok, max_bytes)
      # Mixed valid text and stray bytes, as in real scraped data.
      _check_round_trip('naïve café '.encode() + data[:5] + ' 日本'.encode(), tok, max_bytes)


@pytest.mark.parametrize('text', SCRIPTS)
def test_round_trip_scripts(gpt2, text):
  for max_bytes in (2, 16):
    _check_round_trip(text.encode('utf-8'), gpt2, max_bytes)


def test_long_tokens_split_never_truncated(gpt2):
  word = 'x' * 37
  chunks = _check_round_trip(f'a {word} b'.encode(), WordTokenizer(), 16)
  assert chunks == [b'a', b' xxxxxxxxxxxxxxx', b'xxxxxxxxxxxxxxxx', b'xxxxxx', b' b']
  # GPT-2 has single tokens of many bytes (runs of spaces / dashes): cut at 16, kept whole.
  data = b'-' * 64 + b' ' * 40 + b'end'
  pieces = gpt2.split_bytes(data)
  assert max(len(p) for p in pieces) > 16
  chunks = _check_round_trip(data, gpt2, 16)
  # Every tokenizer boundary is a chunk boundary.
  cuts = set(np.cumsum([len(c) for c in chunks]).tolist())
  assert set(np.cumsum([len(p) for p in pieces]).tolist()) <= cuts


def test_bad_tokenizer_is_caught():
  class Lossy:
    def split_bytes(self, data):
      return [data[:-1]]
  with pytest.raises(ValueError, match='did not give back'):
    chunking.chunk_bytes(b'abc', Lossy(), 4)
  with pytest.raises(ValueError, match='max_bytes_per_chunk'):
    chunking.chunk_bytes(b'abc', WordTokenizer(), 0)


def test_document_layout_mirrors_baseline(gpt2):
  text = 'The cat sat on the mat. ' * 20 + '日本語'
  max_len, max_bytes = 16, 4
  f = chunking.ChunkFeaturizer(gpt2, max_len, max_bytes)
  examples = f.document(text)
  C = max_bytes + 1
  n_chunks = len(f.chunks(text))
  # [eot] + chunks + [eot]: n_chunks + 1 targets in windows of max_len sharing one chunk.
  assert len(examples) == -(-(n_chunks + 1) // max_len)
  for ex in examples:
    assert set(ex) == {'inputs', 'targets', 'loss_mask', 'target_bytes'}
    assert ex['inputs'].shape == ex['targets'].shape and ex['inputs'].shape[1] == C
    assert ex['inputs'].dtype == ex['targets'].dtype == np.int32
    assert len(ex['inputs']) <= max_len
    # Targets are the next chunk's input bytes plus END_OF_CHUNK (or the lone EOT).
    nxt = ex['inputs'][1:]
    tg = ex['targets'][:-1]
    np.testing.assert_array_equal(np.where(tg == chunking.END_OF_CHUNK, 0, tg), nxt)
  first, last = examples[0], examples[-1]
  assert first['inputs'][0].tolist() == [chunking.EOT] + [0] * (C - 1)
  assert last['targets'][-1].tolist() == [chunking.EOT] + [0] * (C - 1)
  assert last['target_bytes'][-1] == 0
  # Every text byte is predicted exactly once: the bits-per-byte denominator is the text.
  total = sum(int(ex['target_bytes'].sum()) for ex in examples)
  assert total == len(text.encode())
  assert chunking.chunks_to_bytes(np.concatenate([ex['targets'] for ex in examples])) == \
      text.encode()
  # The baseline counts the same bytes (the denominators agree across model kinds).
  tf = featurize.TokenFeaturizer(gpt2, max_len)
  assert sum(int(ex['target_bytes'].sum()) for ex in tf.document(text)) == total


def test_make_featurizer_picks_chunks(gpt2):
  from configs import byte_pool as byte_pool_config  # pylint: disable=g-import-not-at-top
  c = byte_pool_config.get_config('tiny')
  c.model.byte_pool.version = 'paper'
  f = factory.make_featurizer(c, gpt2)
  assert isinstance(f, chunking.ChunkFeaturizer)
  assert f.width == c.model.byte_pool.max_bytes_per_chunk + 1
  assert f.max_len == c.model.max_len


def test_empty_and_single_byte_documents(gpt2):
  f = chunking.ChunkFeaturizer(gpt2, 8, 16)
  assert not f.document('')
  (ex,) = f.document('a')
  assert ex['target_bytes'].tolist() == [1, 0]
  assert ex['targets'][0, :2].tolist() == [ord('a') + chunking.BYTE_OFFSET,
                                           chunking.END_OF_CHUNK]


def test_pair_masks_the_continuation(gpt2):
  f = chunking.ChunkFeaturizer(gpt2, 64, 16)
  for context, continuation in [('The capital of France is ', 'Paris'),
                                ('Der Hund', ' bellt laut.'), ('', 'x'), ('東京は', '日本の首都')]:
    ex, mask = f.pair(context, continuation)
    assert mask.shape == ex['loss_mask'].shape
    moved = len(context) - len(context.rstrip())
    cont = (context[len(context) - moved:] + continuation).encode()
    assert int(ex['target_bytes'][mask].sum()) == len(cont)
    assert chunking.chunks_to_bytes(ex['targets'][mask]) == cont
    # No end-of-text before a non-empty context (harness convention): the first context
    # chunk is an input only, never a target.
    ctx_chunks = f.chunks(context.rstrip())
    assert chunking.chunks_to_bytes(ex['targets'][~mask]) == b''.join(ctx_chunks[1:])
    old, old_mask = f.pair(context, continuation, always_prefix_eot=True)
    assert chunking.chunks_to_bytes(old['targets'][old_mask]) == cont
    assert chunking.chunks_to_bytes(old['targets'][~old_mask]) == context.rstrip().encode()
