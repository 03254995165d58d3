"""Generation and incremental scoring for the byte-pool v2 model (ragged byte stream).

The core runs once per chunk on its KV cache (the prefix is never recomputed; a full cache is
rebuilt from the last half of the context, with a warning, as for v1). The local encoder and
decoder are sliding-window transformers, so the output at a symbol depends only on the last
layers x (window - 1) symbols (+ the n-gram span): each new chunk is encoded from a fixed-size
tail of the input stream and each new symbol decoded from a fixed-size tail of the decoder
stream. Those tails cover the receptive field, so the results equal the full forward pass
(up to float rounding of the relative positions); each step costs O(tail), independent of
the text length. The local models keep no KV cache: a tail recompute is one small jitted call.
Each decoder symbol carries its core-output memory (the last K core outputs, K = 1 unless the
decoder cross-attends to several: byte_pool_v2.memory_chunks).
"""

from __future__ import annotations

import functools

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from stlm import ids as byte_ids
from stlm.data import byte_stream
from stlm.data import chunking
from stlm.models import decoding
from stlm.models.byte_pool import v2 as byte_pool_v2

PREFILL_BLOCK = 32


def _round_up(n: int, k: int = 16) -> int:
  return -(-n // k) * k


def tail_lengths(model_cfg) -> tuple[int, int]:
  """(encoder tail, decoder tail): symbols that cover each local model's receptive field."""
  b = model_cfg.byte_pool
  ngram = max(b.ngram_sizes) - 1 if b.ngram_buckets and len(b.ngram_sizes) else 0
  chunk = b.max_bytes_per_chunk + 1
  # A symbol's slot in its chunk reads back to the chunk's start: one more chunk of margin.
  slots = chunk if b.slot_embedding else 0
  enc = b.encoder_layers * (b.local_window - 1) + max(ngram, slots) + chunk
  dec = max(b.decoder_layers * (b.local_window - 1) + 1 + slots, chunk)
  return _round_up(enc), _round_up(dec)


class _Fns:
  """Jitted pieces for one model (compiled once per model config)."""

  def __init__(self, model, model_cfg):
    self.model, self.cfg = model, model_cfg
    self.enc_tail, self.dec_tail = tail_lengths(model_cfg)
    self.memory = byte_pool_v2.memory_chunks(model_cfg)

    @functools.partial(jax.jit, static_argnames=('T',))
    def encode(params, ids, start, seg, T):
      return model.apply({'params': params}, ids, start, seg, T, method='encode')

    @jax.jit
    def core(params, cache, x, seg, pos):
      out, mut = model.apply({'params': params, 'cache': cache}, x, seg, pos, decode=True,
                             method='core_vectors', mutable=['cache'])
      return out, mut['cache']

    @jax.jit
    def decode(params, prev, y, valid, start, seg):
      return model.apply({'params': params}, prev, y, valid, start, seg,
                         method='decoder_logits')

    self.encode, self.core, self.decode = encode, core, decode
    D = model_cfg.hidden_dim

    def init_cache():
      x = jnp.zeros((1, 1, D), jnp.float32)
      one = jnp.ones((1, 1), jnp.int32)
      return model.init(jax.random.key(0), x, one, one * 0, decode=True,
                        method='core_vectors')['cache']
    self.empty_cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                    jax.eval_shape(init_cache))


_FNS = {}


def _fns(model, model_cfg) -> _Fns:
  key = (type(model).__name__, repr(model_cfg.to_dict() if hasattr(model_cfg, 'to_dict')
                                    else model_cfg))
  if key not in _FNS:
    _FNS[key] = _Fns(model, model_cfg)
  return _FNS[key]


def _tail(values, n, fill=0, dtype=np.int32):
  """The last n entries of values, left-padded with fill (1 x n)."""
  values = np.asarray(values[-n:], dtype)
  pad = [(n - len(values), 0)] + [(0, 0)] * (values.ndim - 1)
  return np.pad(values, pad, constant_values=fill)[None]


class StreamState:
  """Host-side history of one text: input stream, core cache, decoder stream."""

  def __init__(self, model, params, model_cfg):
    self.f, self.params, self.cfg = _fns(model, model_cfg), params, model_cfg
    self.max_len = int(model_cfg.max_len)
    self.in_ids, self.in_start = [], []          # input stream (chunks fed to the core)
    self.vectors = []                            # core inputs of the chunks in context
    self.cache, self.n_cached = self.f.empty_cache, 0
    # Decoder stream history; dec_mem: each symbol's core-output memory (K x D, K valid flags).
    self.dec_tgt, self.dec_start, self.dec_mem = [], [], []
    self.recent = []                             # core outputs of the last K chunks fed

  def _memory(self, outputs):
    """The last K of `outputs` (oldest first, zero-padded in front) and which exist."""
    K = self.f.memory
    outputs = outputs[-K:]
    D = int(self.cfg.hidden_dim)
    y = np.zeros((K, D), np.float32)
    if outputs:
      y[K - len(outputs):] = np.stack(outputs)
    return y, np.arange(K) >= K - len(outputs)

  # ---------------------------------------------------------------- core
  def _core(self, vectors):
    x = np.stack(vectors)[None].astype(np.float32)
    T = x.shape[1]
    pos = (self.n_cached + np.arange(T, dtype=np.int32))[None]
    out, self.cache = self.f.core(self.params, self.cache, x, np.ones((1, T), np.int32), pos)
    self.n_cached += T
    return list(np.asarray(out[0]))

  def _core_all(self, vectors):
    self.cache, self.n_cached = self.f.empty_cache, 0
    out, n = [], len(vectors)
    block = min(PREFILL_BLOCK, self.max_len)
    for s in range(0, n - n % block, block):
      out += self._core(vectors[s:s + block])
    for s in range(n - n % block, n):
      out += self._core(vectors[s:s + 1])
    return out

  def _feed_vector(self, x):
    self.vectors.append(x)
    if self.n_cached + 1 > self.max_len:
      keep = max(self.max_len // 2, 1)
      warnings.warn(f'context full ({self.max_len} chunks): re-encoding the last {keep}',
                    stacklevel=3)
      self.vectors = self.vectors[-keep:]
      return self._core_all(self.vectors)[-1]
    return self._core([x])[-1]

  # ---------------------------------------------------------------- encoder
  def prefill(self, chunks: list[bytes]):
    """Feeds `[EOT] + chunks`; the decoder history gets chunks as targets of their cores."""
    seq = byte_stream.Sequence(chunks, eot_start=True, eot_end=False)
    ids, start = seq.symbols(0, seq.num_chunks)
    S = 16
    while S < len(ids):
      S *= 2
    T = _round_up(seq.num_chunks)
    pad = lambda a: np.pad(a, (0, S - len(a)))[None]
    x = np.asarray(self.f.encode(self.params, pad(ids), pad(start),
                                 pad(np.ones(len(ids), np.int32)), T))[0, :seq.num_chunks]
    self.in_ids, self.in_start = list(ids), list(start)
    vectors = list(x)
    if len(vectors) > self.max_len:
      warnings.warn(f'prompt of {len(vectors)} chunks is longer than the context '
                    f'(model.max_len={self.max_len}); keeping its last {self.max_len}',
                    stacklevel=2)
      vectors = vectors[-self.max_len:]
    self.vectors = vectors
    ys = self._core_all(vectors)
    # Chunk k (k >= 1) is the target of the core output at chunk k-1.
    first_y = len(x) - len(ys)   # outputs of chunks dropped from the context are unknown
    for k in range(1, seq.num_chunks):
      sym, st = seq.symbols(k, k + 1)
      mem = self._memory(ys[:max(k - first_y, 1)])
      self.dec_tgt += list(sym)
      self.dec_start += list(st)
      self.dec_mem += [mem] * len(sym)
    self.recent = ys[-self.f.memory:]

  def feed_chunk(self, symbols):
    """Appends a generated chunk (its symbols, ending in END_OF_CHUNK) to both streams."""
    symbols = list(symbols)
    self.in_ids += symbols
    self.in_start += [1] + [0] * (len(symbols) - 1)
    n = self.f.enc_tail
    ids, start = _tail(self.in_ids, n), _tail(self.in_start, n)
    seg = _tail(np.ones(len(self.in_ids)), n)
    x = np.asarray(self.f.encode(self.params, ids, start, seg, n))
    last = int(np.cumsum(start[0])[-1]) - 1     # the new chunk's index inside the tail
    self.recent = (self.recent + [self._feed_vector(x[0, last])])[-self.f.memory:]

  # ---------------------------------------------------------------- decoder
  def symbol_logits(self, chunk_so_far):
    """Masked f32 logits of the next symbol of the chunk after the last chunk fed."""
    tgt = self.dec_tgt + list(chunk_so_far)
    prev = [byte_ids.END_OF_CHUNK] + tgt
    start = self.dec_start + ([1] + [0] * (len(chunk_so_far)))[:len(chunk_so_far) + 1]
    n = self.f.dec_tail
    mems = (self.dec_mem + [self._memory(self.recent)] * (len(chunk_so_far) + 1))[-n:]
    logits = self.f.decode(self.params, _tail(prev, n),
                           _tail(np.stack([y for y, _ in mems]), n, 0.0, np.float32),
                           _tail(np.stack([v for _, v in mems]), n, False, bool),
                           _tail(start, n), _tail(np.ones(len(prev)), n))
    return logits[0, -1]

  def commit_chunk(self, symbols):
    """Records a finished target chunk in the decoder history."""
    symbols = list(symbols)
    self.dec_tgt += symbols
    self.dec_start += [1] + [0] * (len(symbols) - 1)
    self.dec_mem += [self._memory(self.recent)] * len(symbols)
    keep = 4 * self.f.dec_tail   # only the tail is ever read
    del self.dec_tgt[:-keep], self.dec_start[:-keep], self.dec_mem[:-keep]
    del self.in_ids[:-4 * self.f.enc_tail], self.in_start[:-4 * self.f.enc_tail]


def generate(model, params, model_cfg, tokenizer, data: bytes, *, max_bytes, sample,
             emit=None) -> bytes:
  """Bytes after `data`; `sample(logits_V, step) -> int` picks each symbol; `emit(chunk
  bytes) -> stop?` sees every generated chunk."""
  mb = model_cfg.byte_pool.max_bytes_per_chunk
  state = StreamState(model, params, model_cfg)
  state.prefill(chunking.chunk_bytes(data, tokenizer, mb))
  out, step = bytearray(), 0
  while len(out) < max_bytes:
    symbols = []
    while True:   # the masks end every chunk by END_OF_CHUNK or EOT within mb + 1 symbols
      s = int(sample(state.symbol_logits(symbols), step))
      step += 1
      symbols.append(s)
      if s in (byte_ids.END_OF_CHUNK, byte_ids.EOT):
        break
    if symbols[-1] == byte_ids.EOT:
      break
    chunk = byte_stream.stream_to_bytes(symbols)
    out += chunk
    if len(out) >= max_bytes or (emit is not None and emit(chunk)):
      break
    state.commit_chunk(symbols)
    state.feed_chunk(symbols)
  return bytes(out[:max_bytes])


def incremental_logprobs(model, params, model_cfg, chunks: list[bytes], prompt_chunks: int = 0):
  """log p of each chunk after the first `prompt_chunks` (+ the closing EOT) by the
  generation path (teacher-forced): what tests compare with the full forward."""
  state = StreamState(model, params, model_cfg)
  state.prefill(chunks[:prompt_chunks])
  out = []
  seqs = [list(np.frombuffer(c, np.uint8).astype(np.int32) + byte_ids.BYTE_OFFSET)
          + [byte_ids.END_OF_CHUNK] for c in chunks[prompt_chunks:]] + [[byte_ids.EOT]]
  for i, symbols in enumerate(seqs):
    lp = 0.0
    for j, s in enumerate(symbols):
      logits = np.asarray(state.symbol_logits(symbols[:j]), np.float64)
      lp += logits[s] - (np.log(np.sum(np.exp(logits - logits.max()))) + logits.max())
    out.append(lp)
    if i < len(seqs) - 1:
      state.commit_chunk(symbols)
      state.feed_chunk(symbols)
  return np.asarray(out)





def generate_stream(model, params, model_cfg, tokenizer, data, rng, max_bytes, sampling, stats,
                    emit=None):
  """The v2 generation strategy (stlm/models/decoding.py's signature): `generate` with the
  sampling settings, symbol i drawn with key fold_in(rng, i)."""
  del stats
  pick = lambda logits, i: decoding.pick_token(jax.random.fold_in(rng, i), logits, **sampling)
  return generate(model, params, model_cfg, tokenizer, data, max_bytes=max_bytes, sample=pick,
                  emit=emit)
