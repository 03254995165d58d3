"""Generation: sampling filters, cached core == full forward, any prompt, the CLI, batches."""

import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import byte_pool as byte_pool_config
from stlm import generate
from stlm.generate import __main__ as generate_cli
from stlm.models import decoding
from stlm import tokenizers
from stlm.data import chunking
from stlm.models import baseline
from tests import test_byte_pool as tbp

PROMPTS = ['', 'a', 'Once upon a time', '日本語のテキスト', 'مرحبا', 'Привет', '🙂 ok',
           'x\udcff\udc80y']  # the last: undecodable argv bytes (surrogateescape)


@pytest.fixture(scope='module')
def gpt2():
  return tokenizers.GPT2Tokenizer()


@pytest.fixture(scope='module')
def byte_model():
  cfg, model, params, forward = tbp.setup()
  return ml_collections.ConfigDict({'model': cfg}), model, params, forward


@pytest.fixture(scope='module')
def base_model():
  cfg = tbp.small_cfg()
  cfg.kind, cfg.vocab_size = 'baseline', tokenizers.ByteTokenizer.vocab_size
  model = baseline.BaselineLM(cfg)
  ids = jnp.zeros((1, tbp.T), jnp.int32)
  params = tbp.fast_init(model, ids, ids, ids, method='logits')
  logits = tbp.jit(lambda p, x, s, q: model.apply({'params': p}, x, s, q, method='logits'))
  return ml_collections.ConfigDict({'model': cfg}), model, params, logits


def _freqs(samples, n):
  return np.bincount(np.asarray(samples), minlength=n) / len(samples)


def test_sample_logits_filters():
  p = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.broadcast_to(p, (4000, 4)))
  variants = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1.0, top_k=2),
              dict(temperature=1.0, top_p=0.7), dict(temperature=1.0, top_p=0.5),
              dict(temperature=2.0)]
  # One compiled program for all variants (compiling dominates this test's time).
  picks = jax.jit(lambda key, x: [decoding.sample_logits(jax.random.fold_in(key, i), x, **kw)
                                  for i, kw in enumerate(variants)])(jax.random.key(0), logits)
  greedy, plain, top_k, top_p, top_p_half, hot = [np.asarray(x) for x in picks]
  assert np.all(greedy == 0) and np.all(top_p_half == 0)  # the most likely id always stays
  np.testing.assert_allclose(_freqs(plain, 4), p, atol=0.03)
  np.testing.assert_allclose(_freqs(top_k, 4), [0.625, 0.375, 0, 0], atol=0.03)
  np.testing.assert_allclose(_freqs(top_p, 4), [0.625, 0.375, 0, 0], atol=0.03)
  np.testing.assert_allclose(_freqs(hot, 4), p ** 0.5 / np.sum(p ** 0.5), atol=0.03)


def _window_batch(rows, width):
  """A [2, T] batch whose first row holds `rows` as one document from position 0."""
  n = len(rows)
  b = {'inputs': np.zeros((2, tbp.T, width), np.int32),
       'segment_ids': np.zeros((2, tbp.T), np.int32), 'positions': np.zeros((2, tbp.T), np.int32)}
  b['inputs'][0, :n] = rows
  b['segment_ids'][0, :n] = 1
  b['positions'][0, :n] = np.arange(n)
  b['targets'] = b['inputs'].copy()
  b['loss_mask'] = np.ones((2, tbp.T), np.float32)
  b['target_bytes'] = np.zeros((2, tbp.T), np.int32)
  return b


@pytest.mark.slow
def test_cached_core_matches_full_forward(byte_model, gpt2):
  """The next-chunk distribution from the cached core equals the full forward's, at every step."""
  config, model, params, forward = byte_model
  f = chunking.ChunkFeaturizer(gpt2, tbp.T, tbp.MAX_BYTES)
  batch = tbp.pack(f, [[tbp.TEXTS[0]], [tbp.TEXTS[0]]], f.width)
  n = int((batch['segment_ids'][0] > 0).sum())
  _, full = forward(params, batch)
  dec = tbp.jit(lambda p, y, t: model.apply({'params': p}, y, t, method='decode_logits'))
  ctx = decoding.chunk_context(model, params, config.model)
  for t in range(n):
    y = ctx.prefill(batch['inputs'][0, :3]) if t == 2 else (
        ctx.feed(batch['inputs'][0, t]) if t > 2 else None)
    if y is not None:
      cached = dec(params, y[None, None], batch['targets'][:1, t:t + 1])
      np.testing.assert_allclose(cached[0, 0], full[0, t], rtol=1e-4, atol=1e-4)

  # Past the context: a warning, and the cache restarts from the last half of the window.
  rows = list(np.random.default_rng(0).integers(3, 259, (tbp.T + 1, f.width)))
  with pytest.warns(generate.ContextTruncated, match='longer than the context'):
    ctx.prefill(rows)
  with pytest.warns(generate.ContextTruncated, match='context full'):
    y = ctx.feed(rows[0])
  kept = rows[1:][-tbp.T // 2 + 1:] + [rows[0]]
  window = _window_batch(kept, f.width)
  _, full = forward(params, window)
  cached = dec(params, y[None, None], window['targets'][:1, len(kept) - 1:len(kept)])
  np.testing.assert_allclose(cached[0, 0], full[0, len(kept) - 1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_baseline_cache_matches_full_forward(base_model):
  config, model, params, logits = base_model
  ids = np.random.default_rng(1).integers(0, 257, tbp.T)
  seg, pos = np.ones((1, tbp.T), np.int32), np.arange(tbp.T)[None]
  full = logits(params, ids[None], seg, pos)
  ctx = decoding.token_context(model, params, config.model)
  out = ctx.prefill(list(ids[:2]))
  np.testing.assert_allclose(out, full[0, 1], rtol=1e-4, atol=1e-4)
  for t in range(2, tbp.T):
    np.testing.assert_allclose(ctx.feed(int(ids[t])), full[0, t], rtol=1e-4, atol=1e-4)


def test_greedy_generation_is_the_argmax_chunk(byte_model, gpt2):
  """Greedy bytes == slot-by-slot argmax of the full (uncached) forward pass."""
  config, model, params, forward = byte_model
  prompt = 'Hello wonderful'
  out = generate.generate(model, params, config, gpt2, prompt, max_bytes=tbp.MAX_BYTES,
                          temperature=0.0)
  rows, _ = chunking.encode_chunks(chunking.chunk_bytes(prompt.encode(), gpt2, tbp.MAX_BYTES),
                                   tbp.MAX_BYTES + 1, end_of_chunk=False)
  eot = np.zeros((1, tbp.MAX_BYTES + 1), np.int32)
  eot[0, 0] = chunking.EOT
  b = _window_batch(np.concatenate([eot, rows]), tbp.MAX_BYTES + 1)
  t = len(rows)
  b['targets'][0, t] = 0
  for j in range(tbp.MAX_BYTES + 1):
    _, logits = forward(params, b)
    b['targets'][0, t, j] = int(np.argmax(logits[0, t, j]))
    if b['targets'][0, t, j] in (chunking.END_OF_CHUNK, chunking.EOT):
      break
  expected, _ = chunking.decode_chunk_ids(b['targets'][0, t])
  assert out[:len(expected)] == expected[:tbp.MAX_BYTES]


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore::stlm.generate.ContextTruncated')  # byte prompts > 12
@pytest.mark.parametrize('kind', ['byte_pool', 'baseline'])
def test_any_prompt_gives_valid_text(byte_model, base_model, gpt2, kind):
  config, model, params, _ = byte_model if kind == 'byte_pool' else base_model
  tok = gpt2 if kind == 'byte_pool' else tokenizers.ByteTokenizer()
  for i, prompt in enumerate(PROMPTS):
    out = generate.generate(model, params, config, tok, prompt, max_bytes=12, temperature=1.0,
                            top_k=40, top_p=0.95, seed=i)
    assert isinstance(out, bytes) and len(out) <= 12
    out.decode('utf-8', errors='replace')  # never raises
  again = generate.generate(model, params, config, tok, PROMPTS[3], max_bytes=12,
                            temperature=1.0, top_k=40, top_p=0.95, seed=3)
  assert again == generate.generate(model, params, config, tok, PROMPTS[3], max_bytes=12,
                                    temperature=1.0, top_k=40, top_p=0.95, seed=3)
  with pytest.warns(generate.ContextTruncated):
    out = generate.generate(model, params, config, tok, 'word ' * 40, max_bytes=4)
  assert len(out) <= 4


def test_cli_prints_prompt_and_continuation(byte_model, tmp_path, capfd):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from stlm import export  # pylint: disable=g-import-not-at-top
  config, _, params, _ = byte_model
  full = byte_pool_config.get_config('tiny')
  full.model = config.model
  export.save_export(str(tmp_path / 'export'), params, full)
  fv = flags.FlagValues()  # private: the global FLAGS may hold stlm.eval's --checkpoint
  holders = generate_cli.define_flags(fv)
  fv(['generate', f'--checkpoint={tmp_path / "export"}', '--prompt=日本 and', '--max_bytes=8',
      '--temperature=0'])
  text = generate.run(**{k: h.value for k, h in holders.items()})
  printed = capfd.readouterr().out
  assert printed == '日本 and' + text + '\n'
  assert len(text) <= 8  # 8 bytes decode to at most 8 characters (bad ones as U+FFFD)


@pytest.mark.filterwarnings('ignore::stlm.generate.ContextTruncated')
@pytest.mark.parametrize('kind', ['baseline', 'byte_pool', 'byte_pool_v2'])
def test_stop_sequence_cuts_and_streams_in_every_strategy(byte_model, base_model, gpt2, kind):
  if kind == 'byte_pool_v2':
    from tests import test_byte_pool_v2 as tbv2   # pylint: disable=g-import-not-at-top
    cfg, model, params, _ = tbv2.setup()
    config, tok = ml_collections.ConfigDict({'model': cfg}), gpt2
  else:
    config, model, params, _ = byte_model if kind == 'byte_pool' else base_model
    tok = gpt2 if kind == 'byte_pool' else tokenizers.ByteTokenizer()
  kwargs = dict(max_bytes=24, temperature=1.0, seed=5)
  full = generate.generate(model, params, config, tok, 'ab', **kwargs)
  assert len(full) >= 6
  stop = full[3:5].decode('utf-8', errors='ignore') or 'x'
  streamed = []
  cut = generate.generate(model, params, config, tok, 'ab', stop=(stop,),
                          on_text=streamed.append, **kwargs)
  expected = full[:full.find(stop.encode())] if stop.encode() in full else full
  assert cut == expected
  assert ''.join(streamed) == cut.decode('utf-8', errors='replace')


BATCH_MAX_LEN = 40


def batch_baseline(**model_overrides):
  """(config, model, params): a byte-level baseline of BATCH_MAX_LEN positions (untied head:
  varied text) whose end-of-text logit copies that of byte `STOP_EARLY`, scaled up, so some
  prompts end early."""
  cfg = tbp.small_cfg()
  cfg.update(kind='baseline', vocab_size=tokenizers.ByteTokenizer.vocab_size,
             max_len=BATCH_MAX_LEN, tie_embeddings=False, **model_overrides)
  model = baseline.BaselineLM(cfg)
  ids = jnp.zeros((1, 8), jnp.int32)
  params = tbp.fast_init(model, ids, ids, ids, method='logits', seed=3)
  eot = tokenizers.ByteTokenizer.eot_id
  params['lm_head'] = np.array(params['lm_head'])
  params['lm_head'][:, eot] = params['lm_head'][:, STOP_EARLY] * 1.5
  return ml_collections.ConfigDict({'model': cfg}), model, params


@pytest.fixture(scope='module')
def batch_model():
  return batch_baseline()


STOP_EARLY = ord('x')
# Lengths 1 to 45 bytes: the last is longer than the context (truncated, then re-encoded).
BATCH_PROMPTS = ['', 'a', 'Once upon', 'xyz', 'The quick brown fox', 'q' * 45]


def _single_and_batched(model, params, config, tok, prompts, batch_size, **kwargs):
  single = [generate.generate(model, params, config, tok, p, **kwargs) for p in prompts]
  batched = generate.generate_batch(model, params, config, tok, prompts,
                                    batch_size=batch_size, **kwargs)
  return single, batched


@pytest.mark.filterwarnings('ignore::stlm.generate.ContextTruncated')
def test_batched_greedy_equals_single_per_row(batch_model):
  config, model, params = batch_model
  tok = tokenizers.ByteTokenizer()
  kwargs = dict(max_bytes=16, temperature=0.0)
  free = [generate.generate(model, params, config, tok, p, **kwargs) for p in BATCH_PROMPTS]
  assert any(len(out) < 16 for out in free)     # a row ends at end-of-text ...
  assert any(len(out) == 16 for out in free)    # ... while others run to max_bytes
  stop = free[2][4:6]                            # a stop sequence that cuts row 2 short
  # 4 rows a batch does not divide 6 prompts: the last batch is filled up.
  single, batched = _single_and_batched(model, params, config, tok, BATCH_PROMPTS, 4,
                                        stop=(stop,), **kwargs)
  assert batched == single
  assert single[2] == free[2][:free[2].find(stop)]
  assert len(single[2]) < len(free[2])


@pytest.mark.filterwarnings('ignore::stlm.generate.ContextTruncated')
def test_batched_sampling_uses_each_prompts_own_keys(batch_model):
  config, model, params = batch_model
  tok = tokenizers.ByteTokenizer()
  single, batched = _single_and_batched(model, params, config, tok, BATCH_PROMPTS[:4], 3,
                                        max_bytes=10, temperature=1.0, top_k=20, seed=7)
  assert batched == single
  assert len(set(single)) > 1


@pytest.mark.filterwarnings('ignore::stlm.generate.ContextTruncated')
@pytest.mark.parametrize('variant', [
    dict(pause_before_continuation=2),                                # pauses fed to all rows
    dict(pause_every=3, pause_count=1),                               # one at a time
    dict(num_layers=2, early_exit_layers='1', early_exit_threshold=0.05),
])
def test_batched_greedy_equals_single_with_pauses_and_early_exit(variant):
  config, model, params = batch_baseline(**variant)
  tok = tokenizers.ByteTokenizer()
  single, batched = _single_and_batched(model, params, config, tok, BATCH_PROMPTS[1:5], 4,
                                        max_bytes=12, temperature=0.0)
  assert batched == single
  if 'early_exit_threshold' in variant:
    stats = {}
    generate.generate_batch(model, params, config, tok, BATCH_PROMPTS[1:5], max_bytes=12,
                            stats=stats)
    assert 1.0 < stats['layers_per_unit'] < 2.0   # some units exit after layer 1, some not


@pytest.mark.filterwarnings('ignore::stlm.generate.ContextTruncated')
@pytest.mark.parametrize('variant', [{}, dict(pause_every=3, pause_count=1)])
def test_max_units_stops_after_that_many_tokens_batched_or_not(variant):
  config, model, params = batch_baseline(**variant)
  tok = tokenizers.ByteTokenizer()   # one byte a token: the byte count is the unit count
  free = [generate.generate(model, params, config, tok, p, max_bytes=16)
          for p in BATCH_PROMPTS[1:5]]
  single, batched = _single_and_batched(model, params, config, tok, BATCH_PROMPTS[1:5], 4,
                                        max_bytes=16, max_units=5)
  assert batched == single == [out[:5] for out in free]
  assert any(len(out) == 5 < len(f) for out, f in zip(single, free))
  with pytest.raises(ValueError, match='max_units=0'):
    generate.generate(model, params, config, tok, 'a', max_units=0)
  with pytest.raises(ValueError, match='max_units=0'):
    generate.generate_batch(model, params, config, tok, ['a'], max_units=0)


def test_batched_prompt_over_the_context_warns_like_the_single_path(batch_model):
  config, model, params = batch_model
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    out = generate.generate_batch(model, params, config, tokenizers.ByteTokenizer(),
                                  ['word ' * 10, 'a'], max_bytes=4)
  messages = [str(w.message) for w in caught if w.category is generate.ContextTruncated]
  assert any('longer than the context' in m for m in messages)
  assert len(out) == 2 and all(len(o) <= 4 for o in out)


def test_batch_size_must_be_positive_and_no_prompts_give_no_texts(batch_model):
  config, model, params = batch_model
  with pytest.raises(ValueError, match='batch_size=0'):
    generate.generate_batch(model, params, config, tokenizers.ByteTokenizer(), ['a'],
                            batch_size=0)
  assert generate.generate_batch(model, params, config, tokenizers.ByteTokenizer(), []) == []


def test_byte_pool_batches_one_prompt_at_a_time_with_the_same_results(byte_model, gpt2):
  config, model, params, _ = byte_model
  prompts = ['Hello', 'ab', 'Hello']
  free = generate.generate(model, params, config, gpt2, 'ab', max_bytes=12, temperature=0.0)
  stop = free[2:4].decode('utf-8', errors='ignore') or 'x'
  single, batched = _single_and_batched(model, params, config, gpt2, prompts, 2,
                                        max_bytes=12, temperature=0.0, stop=(stop,))
  assert batched == single
  assert batched[0] == batched[2]
