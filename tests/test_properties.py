"""Property-based checks (hypothesis) of the invariants training and scoring rely on.

Tokenizers and byte chunking give back every byte of any text (also text decoded from invalid
UTF-8 with decode_errors=replace, and every GPT-2 token), windowing and packing keep every
target exactly once, and the scorer's context/continuation split loses no byte.
"""

import collections

import grain
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import ml_collections
import numpy as np
import pytest

from stlm import tokenizers
from stlm.data import chunking
from stlm.data import corpus
from stlm.data import featurize
from stlm.data import pipeline

# Modest example counts: these run in CI on 2 cores.
FEW = settings(max_examples=30, deadline=None)

TEXT = st.text(st.characters(exclude_categories=('Cs',)), max_size=60)  # any code point
RAW = st.binary(max_size=60)


@pytest.fixture(scope='module', params=['gpt2', 'sentencepiece', 'bytes'])
def tok(request, tmp_path_factory):
  path = tmp_path_factory.mktemp('sp') / 'sp.model'
  cfg = ml_collections.ConfigDict(dict(kind=request.param, sp_model_path=str(path),
                                       sp_vocab_size=400))
  texts = [text for _, text in corpus.builtin_documents()]
  return tokenizers.build_tokenizer(cfg, texts if request.param == 'sentencepiece' else None)


def replaced(raw: bytes) -> str:
  """What a corpus file of these bytes becomes with data.decode_errors=replace."""
  return corpus._decode('f.txt', raw, 'replace')  # pylint: disable=protected-access


@FEW
@given(text=TEXT, raw=RAW)
def test_tokenizers_round_trip_any_text(tok, text, raw):
  for t in (text, replaced(raw)):
    ids = tok.encode(t)
    assert tok.decode(ids) == t
    assert b''.join(tok.token_bytes(i) for i in ids) == t.encode('utf-8')
    assert b''.join(tok.split_bytes(t.encode('utf-8'))) == t.encode('utf-8')
  # split_bytes takes raw bytes (byte-pool chunking of any data), valid UTF-8 or not.
  assert b''.join(tok.split_bytes(raw)) == raw


def test_every_gpt2_token_round_trips():
  tok = tokenizers.GPT2Tokenizer()
  for i in range(tok.vocab_size):
    if i == tok.eot_id:
      continue
    data = tok.token_bytes(i)
    assert data and b''.join(tok.split_bytes(data)) == data, i
    try:
      text = data.decode('utf-8')
    except UnicodeDecodeError:
      continue  # a partial UTF-8 sequence: its bytes still round-trip through split_bytes
    assert tok.decode(tok.encode(text)) == text, i


@FEW
@given(raw=RAW, max_bytes=st.integers(1, 5))
def test_byte_chunking_round_trips_any_bytes(raw, max_bytes):
  tok = tokenizers.ByteTokenizer() if max_bytes % 2 else tokenizers.GPT2Tokenizer()
  chunks = chunking.chunk_bytes(raw, tok, max_bytes)
  assert b''.join(chunks) == raw and all(1 <= len(c) <= max_bytes for c in chunks)
  ids, _ = chunking.encode_chunks(chunks, chunking.chunk_width(max_bytes), end_of_chunk=True)
  assert chunking.chunks_to_bytes(ids) == raw
  assert b''.join(chunking.decode_chunk_ids(r)[0] for r in ids) == raw


def _featurizers(max_len):
  byte_tok = tokenizers.ByteTokenizer()
  return [featurize.TokenFeaturizer(byte_tok, max_len),
          chunking.ChunkFeaturizer(tokenizers.GPT2Tokenizer(), max_len, max_bytes_per_chunk=3)]


def _target_key(f, targets):
  """A hashable form of one target (a token id, or a chunk's byte row)."""
  return tuple(np.asarray(targets).reshape(-1).tolist()) if isinstance(
      f, chunking.ChunkFeaturizer) else int(targets)


@FEW
@given(docs=st.lists(TEXT.filter(bool), min_size=1, max_size=6), max_len=st.integers(2, 9))
def test_packing_never_drops_or_duplicates_a_target(docs, max_len):
  for f in _featurizers(max_len):
    examples = [ex for d in docs for ex in f.document(d)]
    want = collections.Counter(
        (i, _target_key(f, t)) for i, ex in enumerate(examples) for t in ex['targets'])
    # Tag each example's targets with its index through target_bytes' twin: loss_mask is 1
    # everywhere, so give every example a distinct mask value to find it after packing.
    tagged = [dict(ex, loss_mask=np.full_like(ex['loss_mask'], i + 1)) for i, ex in
              enumerate(examples)]
    config = ml_collections.ConfigDict(dict(seed=0, model=dict(max_len=max_len)))
    ds = grain.MapDataset.source(tagged).to_iter_dataset()
    packed = pipeline._pack(ds, config, bins=3, shuffle=False)  # pylint: disable=protected-access
    got = collections.Counter()
    for row in packed:
      for mask, seg, target in zip(row['loss_mask'], row['segment_ids'], row['targets']):
        if seg > 0:
          got[(int(mask) - 1, _target_key(f, target))] += 1
        else:
          assert mask == 0
    assert got == want


@FEW
@given(context=TEXT, continuation=TEXT.filter(bool))
def test_context_continuation_split_loses_no_byte(context, continuation):
  for f in _featurizers(max_len=512):
    if isinstance(f, chunking.ChunkFeaturizer):
      piece = lambda unit: chunking.decode_chunk_ids(unit)[0]
    else:
      piece = lambda unit: f.tokenizer.token_bytes(int(unit))
    # Both prefix conventions: end-of-text only before an empty context (the harness's,
    # default), or always. The first input (end-of-text: b'', or the context's first unit,
    # which is never a target) plus the targets is the whole text.
    for always_prefix_eot in (False, True):
      example, mask = f.pair(context, continuation, always_prefix_eot=always_prefix_eot)
      pieces = [piece(t) for t in example['targets']]
      first = piece(example['inputs'][0])
      assert not always_prefix_eot or first == b''
      ctx = first + b''.join(p for p, m in zip(pieces, mask) if not m)
      cont = b''.join(p for p, m in zip(pieces, mask) if m)
      assert ctx + cont == (context + continuation).encode('utf-8')
      stripped = context.rstrip()
      assert ctx == stripped.encode('utf-8')   # trailing whitespace moves to the continuation
      assert cont == (context[len(stripped):] + continuation).encode('utf-8')
