"""BytePoolV2LM: no leaks by perturbation (training and generation paths), per-symbol
normalisation, padding inert, generation path == full forward, the parameter budget."""

import functools

import jax
import numpy as np
import pytest

from configs import byte_pool as byte_pool_config
from stlm import ids as byte_ids
from stlm.data import layout
from stlm import generate
from stlm.models.byte_pool import v2_generation as generate_stream
from stlm import tokenizers
from stlm.data import byte_stream
from stlm.data import chunking
from stlm.models.byte_pool import params as byte_pool_params
from stlm.models.byte_pool import v2 as byte_pool_v2
from stlm.models.byte_pool import v2_kind as byte_pool_v2_kind
from stlm.models import factory
from tests import param_fill
from tests import test_byte_pool as tbp

T = 12
MAX_BYTES = 6
TEXTS = ['Hello wonderful world, 日! The byte stream.', 'Byte pools.', 'Zürich ☃ x']
GPT2 = tokenizers.GPT2Tokenizer()


def small_cfg(**byte_overrides):
  m = tbp.small_cfg()
  m.byte_pool.update(version='v2', local_window=8, ngram_sizes=(2, 3), ngram_buckets=64,
                     stream_len=48)
  m.byte_pool.update(byte_overrides)
  return m


@functools.lru_cache(maxsize=None)
def setup(**overrides):
  cfg = small_cfg(**dict(overrides))
  model = byte_pool_v2.BytePoolV2LM(cfg)
  params = param_fill.random_params(model, byte_pool_v2_kind.dummy_batch(cfg, 2, T))
  forward = tbp.jit(lambda p, b: model.apply({'params': p}, b, method='scores'))
  return cfg, model, params, forward


@pytest.fixture(scope='module')
def featurizer():
  return byte_stream.StreamFeaturizer(GPT2, T, MAX_BYTES, 48)


@pytest.fixture(scope='module')
def batch(featurizer):
  """Row 0: the first window of TEXTS[0]; row 1: TEXTS[1] and TEXTS[2] packed as two segments."""
  ex0 = featurizer.document(TEXTS[0])[0]
  b = featurizer.batch_spans([(ex0, 0, len(ex0['loss_mask']))] * 2, 2, T)
  e1, e2 = featurizer.document(TEXTS[1])[0], featurizer.document(TEXTS[2])[0]
  S = b['inputs'].shape[1]
  for key in byte_stream.EXAMPLE_KEYS:
    row = np.concatenate([e1[key], e2[key]])
    n = S if key in byte_stream.STREAM_KEYS else T
    b[key][1] = np.pad(row, (0, n - len(row)))
  for key, seg_key in (('inputs', 'inputs_segment_ids'), ('targets', 'targets_segment_ids'),
                       ('loss_mask', 'segment_ids')):
    n1, n2 = len(e1[key]), len(e2[key])
    b[seg_key][1] = 0
    b[seg_key][1, :n1], b[seg_key][1, n1:n1 + n2] = 1, 2
  n1, n2 = len(e1['loss_mask']), len(e2['loss_mask'])
  b['positions'][1] = 0
  b['positions'][1, :n1], b['positions'][1, n1:n1 + n2] = np.arange(n1), np.arange(n2)
  return b


def test_byte_ids_are_shared():
  assert (byte_pool_v2.END_OF_CHUNK, byte_pool_v2.EOT) == (chunking.END_OF_CHUNK, chunking.EOT)


# Model variants: (pooling, contexts, n-grams); each compiles once for the whole module.
# DEFAULT (configs/byte_pool.py): the decoder's only view across chunks is the core
# (chunk-only byte context), which it cross-attends before every block; slot-concat pooling.
DEFAULT = {}
# The window decoder (earlier chunks' bytes in view), the core cross-attended after its first
# attention, mean pooling: the previous default; the variants below start from it.
WINDOW = {'decoder_context': 'window', 'condition_at': 'after_attention', 'pooling': 'mean'}
ATTENTION_CHUNK = dict(WINDOW, pooling='attention', decoder_context='chunk',
                       encoder_context='chunk', ngram_buckets=0)
LAST = dict(WINDOW, pooling='last')
# A core projection per slot (MEGABYTE); and the first v2 (no slot embeddings, the core
# output added at the decoder's input).
SLOTS = dict(WINDOW, slot_embedding=True, condition='slot_add')
PLAIN = dict(WINDOW, slot_embedding=False, condition='add', condition_at='input')
# ADD: one projected core vector added after the first attention instead.
ADD = dict(WINDOW, condition='add')
# The default with two decoder blocks (own queries per block) and two hash functions per
# n-gram size; CORE_ADD adds one projected core vector before every block instead.
CORE_CHUNK = {'decoder_layers': 2, 'ngram_hashes': 2}
CORE_ADD = dict(CORE_CHUNK, condition='add')


@pytest.mark.parametrize('overrides', [
    DEFAULT, WINDOW, CORE_CHUNK, pytest.param(ATTENTION_CHUNK, marks=pytest.mark.slow)],
    ids=['default', 'window', 'core_chunk', 'attn_chunk'])
def test_outputs_units_and_normalisation(batch, overrides):
  _, _, params, forward = setup(**overrides)
  out, logits = forward(params, batch)
  real = batch['segment_ids'] > 0
  np.testing.assert_array_equal(out['units'], np.where(real, batch['target_bytes'] + 1, 0))
  lp = np.asarray(out['logprobs'])
  assert np.all(lp[real] < 0) and np.all(lp[~real] == 0)
  # Each symbol is a distribution over exactly what its slot may hold.
  p = np.exp(np.asarray(logits, np.float64) - jax.nn.logsumexp(logits, -1)[..., None])
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
  slot = np.asarray(byte_pool_v2.slot_index(batch['targets_chunk_start']))
  assert np.all(p[..., byte_ids.PAD] == 0)
  assert np.all(p[slot == 0][:, byte_ids.END_OF_CHUNK] == 0)
  assert np.all(p[slot > 0][:, byte_ids.EOT] == 0)
  np.testing.assert_allclose(p[slot == MAX_BYTES][:, byte_ids.END_OF_CHUNK], 1.0)


def _chunk_bounds(starts):
  b = np.flatnonzero(starts)
  return np.append(b, len(starts))


@pytest.mark.parametrize('overrides', [
    DEFAULT, WINDOW, CORE_CHUNK, *(pytest.param(o, marks=pytest.mark.slow)
                                   for o in (ATTENTION_CHUNK, LAST, SLOTS, PLAIN, ADD, CORE_ADD))],
    ids=['default', 'window', 'core_chunk', 'attn_chunk', 'last', 'slots', 'plain', 'add',
         'core_add'])
def test_no_leak_from_later_chunks(batch, overrides):
  """Changing a byte of chunk k+1 (input k+1 = target k) never moves chunks <= k-1, nor the
  symbols of target k up to the changed one; the change is seen afterwards."""
  _, _, params, forward = setup(**overrides)
  out0, logits0 = forward(params, batch)
  k = 3
  b = {key: np.array(v) for key, v in batch.items()}
  ib, tb = _chunk_bounds(b['inputs_chunk_start'][0]), _chunk_bounds(b['targets_chunk_start'][0])
  i_pos, t_pos = ib[k + 1], tb[k]        # first byte of input chunk k+1 == of target chunk k
  assert b['inputs'][0, i_pos] == b['targets'][0, t_pos] >= byte_ids.BYTE_OFFSET
  new = b['inputs'][0, i_pos] % 200 + 7
  b['inputs'][0, i_pos] = b['targets'][0, t_pos] = new
  out1, logits1 = forward(params, b)
  np.testing.assert_array_equal(out1['logprobs'][0, :k], out0['logprobs'][0, :k])
  np.testing.assert_array_equal(logits1[0, :t_pos + 1], logits0[0, :t_pos + 1])
  np.testing.assert_array_equal(logits1[1], logits0[1])     # other rows untouched
  assert not np.allclose(logits1[0, t_pos + 1], logits0[0, t_pos + 1])
  assert not np.allclose(out1['logprobs'][0, k + 1], out0['logprobs'][0, k + 1])


@pytest.mark.slow
@pytest.mark.parametrize('overrides', [{}, {'condition': 'add'}], ids=['cross', 'add'])
def test_core_output_of_chunk_t_conditions_the_first_symbol_of_chunk_t_plus_1(batch, overrides):
  """Alignment: with both local models limited to their own chunk, the first symbol of target
  chunk k (text chunk k+1) learns of input chunk k only through the core output at k; a
  change there reaches it, and nothing of target chunk k-1 moves."""
  _, _, params, forward = setup(**ATTENTION_CHUNK, **overrides)
  _, logits0 = forward(params, batch)
  k = 3
  b = {key: np.array(v) for key, v in batch.items()}
  ib, tb = _chunk_bounds(b['inputs_chunk_start'][0]), _chunk_bounds(b['targets_chunk_start'][0])
  b['inputs'][0, ib[k]] = b['inputs'][0, ib[k]] % 200 + 7     # input chunk k only
  _, logits1 = forward(params, b)
  np.testing.assert_array_equal(logits1[0, :tb[k]], logits0[0, :tb[k]])
  assert not np.allclose(logits1[0, tb[k]], logits0[0, tb[k]])


@pytest.mark.parametrize('overrides', [CORE_CHUNK, pytest.param(CORE_ADD, marks=pytest.mark.slow)],
                         ids=['cross', 'add'])
def test_a_chunk_only_decoder_sees_earlier_chunks_only_through_the_core(batch, overrides):
  """With decoder_context 'chunk', a byte of an earlier chunk reaches a later chunk's logits
  only through the core: with the core outputs held fixed (a core_transform returning the
  unperturbed run's), perturbing it moves nothing of the later chunks; through the core it
  does."""
  cfg, model, params, forward = setup(**overrides)
  _, logits0 = forward(params, batch)
  k = 3
  b = {key: np.array(v) for key, v in batch.items()}
  ib, tb = _chunk_bounds(b['inputs_chunk_start'][0]), _chunk_bounds(b['targets_chunk_start'][0])
  # Input chunk k+1 is target chunk k: perturb it in both streams, as the data would.
  b['inputs'][0, ib[k + 1]] = b['targets'][0, tb[k]] = b['inputs'][0, ib[k + 1]] % 200 + 7
  y0 = model.apply({'params': params}, batch['inputs'], batch['inputs_chunk_start'],
                   batch['inputs_segment_ids'], T, method='encode')
  y0 = model.apply({'params': params}, y0, batch['segment_ids'], batch['positions'],
                   method='core_vectors')
  frozen = model.clone(core_transform=lambda y, seg: y0)
  scores = jax.jit(lambda p, b: frozen.apply({'params': p}, b, method='scores')[1])
  later = slice(tb[k + 1], tb[-1])            # target chunks k+1 .. (after the changed chunk)
  np.testing.assert_array_equal(scores(params, b)[0, later], scores(params, batch)[0, later])
  _, logits1 = forward(params, b)
  assert not np.allclose(logits1[0, later], logits0[0, later])


def test_every_layer_and_slot_pooling_params():
  """condition_at 'every_layer' gives the cross-attention one query/output pair per decoder
  block; pooling 'slots' one max_bytes + 1 slot block projection instead of to_core; a
  second hash function one more table per n-gram size."""
  cfg, _, params, _ = setup(**CORE_CHUNK)
  cross = params['byte_decoder']['cross']
  assert {'q_kernel', 'q_kernel_1', 'o_kernel', 'o_kernel_1'} <= set(cross)
  enc = params['byte_encoder']
  assert 'to_core' not in enc
  assert enc['slots_to_core'].shape == (MAX_BYTES + 1, cfg.byte_pool.byte_dim, cfg.hidden_dim)
  assert {'ngram_2', 'ngram_3', 'ngram_2_1', 'ngram_3_1'} <= set(enc)


@pytest.mark.slow
def test_padding_and_neighbours_change_nothing(batch, featurizer):
  """Garbage beyond a row's end, and a packed neighbour document, leave a document's log-probs
  unchanged: segment 2 of row 1 scores as if alone."""
  _, _, params, forward = setup()
  out0, _ = forward(params, batch)
  b = {key: np.array(v) for key, v in batch.items()}
  rng = np.random.default_rng(0)
  for key, seg in (('inputs', 'inputs_segment_ids'), ('targets', 'targets_segment_ids')):
    pad = b[seg] == 0
    b[key][pad] = rng.integers(3, 259, pad.sum())
  out1, _ = forward(params, b)
  real = batch['segment_ids'] > 0
  np.testing.assert_allclose(np.asarray(out1['logprobs'])[real],
                             np.asarray(out0['logprobs'])[real], rtol=1e-5, atol=1e-5)
  e2 = featurizer.document(TEXTS[2])[0]
  alone = featurizer.batch_spans([(e2, 0, len(e2['loss_mask']))] * 2, 2, T)
  out2, _ = forward(params, alone)
  n1, n2 = len(featurizer.document(TEXTS[1])[0]['loss_mask']), len(e2['loss_mask'])
  np.testing.assert_allclose(out0['logprobs'][1, n1:n1 + n2], out2['logprobs'][0, :n2],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('overrides', [SLOTS, PLAIN, WINDOW, DEFAULT, CORE_CHUNK],
                         ids=['slots', 'plain', 'window', 'default', 'core_chunk'])
def test_generation_path_equals_full_forward_and_does_not_leak(featurizer, overrides):
  """Also checks the generation tails: with slot embeddings a symbol's slot reads back to
  its chunk's start, which the tails must cover (a tail one chunk short fails here)."""
  cfg, model, params, forward = setup(**overrides)
  chunks = featurizer.chunks(TEXTS[0])[:10]   # + 2 end-of-text chunks: fits T = 12
  (ex,) = featurizer.document(b''.join(chunks))
  assert featurizer.chunks(b''.join(chunks)) == chunks
  full = featurizer.batch_spans([(ex, 0, len(ex['loss_mask']))] * 2, 2, T)
  want = np.asarray(forward(params, full)[0]['logprobs'][0, :len(chunks) + 1])
  got = generate_stream.incremental_logprobs(model, params, cfg, chunks, prompt_chunks=6)
  np.testing.assert_allclose(got, want[6:], rtol=1e-4, atol=1e-4)
  # Generation path, no leak: chunks after k never change the log-prob of chunk k.
  k = 7
  changed = chunks[:k + 1] + [b'ZZ'] + chunks[k + 2:]
  got2 = generate_stream.incremental_logprobs(model, params, cfg, changed, prompt_chunks=6)
  np.testing.assert_array_equal(got2[:k + 1 - 6], got[:k + 1 - 6])
  assert not np.allclose(got2[k + 1 - 6:], got[k + 1 - 6:])


@pytest.mark.slow
def test_greedy_generation_is_the_argmax(featurizer):
  cfg, model, params, forward = setup()
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'model': cfg})
  prompt = 'Hello wonderful'
  out = generate.generate(model, params, config, GPT2, prompt, max_bytes=12, temperature=0.0)
  assert isinstance(out, bytes) and 0 < len(out) <= 12
  # The first generated chunk is the argmax, symbol by symbol, of the generation path (which
  # equals the full forward pass: test above).
  chunks_p = featurizer.chunks(prompt)
  state = generate_stream.StreamState(model, params, cfg)
  state.prefill(chunks_p)
  symbols = []
  while not symbols or symbols[-1] not in (byte_ids.END_OF_CHUNK, byte_ids.EOT):
    symbols.append(int(np.argmax(state.symbol_logits(symbols))))
  assert out.startswith(byte_stream.stream_to_bytes(symbols)[:12])


def test_param_budget_and_report():
  """v2 byte parts >= 90% smaller than the baseline's embedding + head at every preset."""
  for preset in ('tiny', '10m', '50m', '100m'):
    cfg = byte_pool_config.get_config(preset).model
    cfg.byte_pool.version = 'v2'
    params = factory.abstract_params(factory.build_model(cfg), cfg)
    report = byte_pool_params.param_report(params, cfg)
    assert report['byte_total'] <= 0.1 * report['baseline_embed_head'], (preset, report)
    assert 'fewer' in byte_pool_params.format_param_report(report)


def test_the_byte_pool_config_trains_v2_by_default():
  """configs/byte_pool.py picks v2 with the chunk-only decoder steered by the core in every
  block and slot-concat pooling (the comparison's row core_chunk_slots); the base config keeps
  the paper's version for configs that switch model.kind."""
  from stlm import config as config_lib  # pylint: disable=g-import-not-at-top
  from stlm.experiments import rows  # pylint: disable=g-import-not-at-top
  for preset in ('tiny', '10m'):
    b = byte_pool_config.get_config(preset).model.byte_pool
    row = rows.ROWS['core_chunk_slots'].byte_pool
    assert {k: b[k] for k in row if k != 'decoder_layers'} == {
        k: v for k, v in row.items() if k != 'decoder_layers'}
  assert byte_pool_config.get_config('10m').model.byte_pool.decoder_layers == 2
  assert config_lib.base_config().model.byte_pool.version == 'paper'


def test_cross_attention_flops_and_config_errors():
  """The FLOPs accounting adds exactly the cross-attention's work (query/output projections
  and K keys per symbol, key/value projections per chunk, minus the add's projection); a bad
  cross_chunks names its key."""
  from stlm.config import validate as config_validate  # pylint: disable=g-import-not-at-top
  cfg = byte_pool_config.get_config('tiny')
  m = cfg.model
  breakdown = {'core': 1000}
  m.byte_pool.condition = 'add'
  add = byte_pool_v2_kind.flops_per_target(m, breakdown)
  m.byte_pool.update(condition='cross_attention', cross_chunks=3)
  cross = byte_pool_v2_kind.flops_per_target(m, breakdown)
  E, D = m.byte_pool.byte_dim, m.hidden_dim
  symbols = layout.stream_len(m.max_len, m.byte_pool.max_bytes_per_chunk) / m.max_len
  want = symbols * (6 * 2 * E * E + 12 * 3 * E) + 6 * D * E
  assert cross - add == pytest.approx(want)
  m.byte_pool.cross_chunks = 0
  with pytest.raises(config_validate.ConfigError, match='model.byte_pool.cross_chunks'):
    config_validate.validate(cfg)


def test_every_layer_and_slot_pooling_flops_and_config_errors():
  """'every_layer' adds one query/output projection pair and its scores per extra decoder
  block; pooling 'slots' max_bytes more E x D blocks per chunk than to_core; bad values of
  the new keys name them."""
  from stlm.config import validate as config_validate  # pylint: disable=g-import-not-at-top
  cfg = byte_pool_config.get_config('tiny')
  m = cfg.model
  m.byte_pool.update(condition='cross_attention', cross_chunks=4, decoder_layers=3,
                     condition_at='after_attention', pooling='mean')
  breakdown = {'core': 1000}
  once = byte_pool_v2_kind.flops_per_target(m, breakdown)
  m.byte_pool.condition_at = 'every_layer'
  every = byte_pool_v2_kind.flops_per_target(m, breakdown)
  E, D = m.byte_pool.byte_dim, m.hidden_dim
  symbols = layout.stream_len(m.max_len, m.byte_pool.max_bytes_per_chunk) / m.max_len
  assert every - once == pytest.approx(2 * symbols * (6 * 2 * E * E + 12 * 4 * E))
  m.byte_pool.pooling = 'slots'
  slots = byte_pool_v2_kind.flops_per_target(m, breakdown)
  assert slots - every == pytest.approx(6 * m.byte_pool.max_bytes_per_chunk * D * E)
  for key, value in (('pooling', 'max'), ('ngram_hashes', 0), ('condition_at', 'output')):
    bad = byte_pool_config.get_config('tiny')
    bad.model.byte_pool[key] = value
    with pytest.raises(config_validate.ConfigError, match=f'model.byte_pool.{key}'):
      config_validate.validate(bad)


def test_a_chunk_context_needs_only_a_one_chunk_window():
  """With chunk groups of at most C symbols, sliding-window attention over a C-wide window
  equals the wide window's (the chunk mask lets no farther key through), so chunk-context
  local models compute C keys a symbol, not local_window."""
  from stlm.models.byte_pool import local_transformer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  B, L, H, D, C = 2, 50, 2, 4, 7
  q, k, v = (rng.normal(size=(B, L, H, D)).astype(np.float32) for _ in range(3))
  starts = rng.random((B, L)) < 0.3
  starts[:, ::C] = True                                 # no chunk longer than C symbols
  group = np.cumsum(starts, axis=1)
  seg = np.ones((B, L), np.int32)
  seg[1, 40:] = 0                                       # padding
  wide = local_transformer.sliding_window_attention(q, k, v, seg, group, 64)
  narrow = local_transformer.sliding_window_attention(q, k, v, seg, group, C)
  np.testing.assert_allclose(narrow, wide, rtol=1e-5, atol=1e-6)
  b = small_cfg(decoder_context='chunk', encoder_context='window').byte_pool
  assert (byte_pool_v2.attention_window(b, 'chunk'), byte_pool_v2.attention_window(b, 'window')
          ) == (min(b.local_window, MAX_BYTES + 1), b.local_window)
