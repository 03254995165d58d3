"""Cached decoding shared by every kind's generation strategy.

A generation strategy (a model kind's `generation`, stlm/models/kinds.py) is
`fn(model, params, model_cfg, tokenizer, prompt bytes, rng, max_bytes, sampling, stats,
emit=None) -> bytes`; `stats` (a dict) receives `layers_per_unit`; `emit`, when given, is
called with the bytes of every generated unit as soon as it is picked and stops the
generation by returning True (stop sequences, streaming). `generate_tokens` is the strategy of
token kinds: token by token with the KV cache (the model's `logits(..., decode=True)`).
A prompt longer than the context keeps its last max_len units (with a warning); when the
cache fills during generation the last half of the context is re-encoded into a fresh cache
(also warned).

A batched strategy (a kind's `batched_generation`) is `fn(model, params, model_cfg, tokenizer,
prompts: list of bytes, rng, max_bytes, sampling, stats, stops=(), max_units=None) -> list of
bytes`: each prompt's continuation, as the kind's `generation` of that prompt alone with the
same rng gives it, cut at its first stop sequence (`cut_at_stop`), of at most max_units units
(`unit_limit`: an `emit` stops a single-sequence strategy after that many units). `generate_tokens_batched` decodes
the rows of token kinds together (`BatchedContext`); `one_at_a_time` turns any strategy into
a batched one that runs the prompts in turn.
"""

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from stlm import ids
from stlm.data import pauses
from stlm.models import kinds


class ContextTruncated(UserWarning):
  """The prompt or the generated text no longer fits the model's context."""


def unit_limit(emit, max_units):
  """`emit` that also stops the generation once max_units units (tokens, or chunks for the
  byte-pool kinds) have been emitted; `emit` itself when max_units is None."""
  if max_units is None:
    return emit
  if int(max_units) < 1:
    raise ValueError(f'max_units={max_units} must be >= 1')
  count = [0]

  def limited(new: bytes) -> bool:
    count[0] += 1
    stopped = emit(new) if emit is not None else False
    return bool(stopped) or count[0] >= int(max_units)
  return limited


def cut_at_stop(data: bytes, stops) -> bytes:
  """`data` up to (not including) its first occurrence of any of `stops` (bytes)."""
  ends = [i for i in (data.find(s) for s in stops if s) if i >= 0]
  return data[:min(ends)] if ends else data


def sample_logits(rng, logits_xV, *, temperature=1.0, top_k=0, top_p=1.0):
  """Samples ids [...] from logits [..., V]; temperature 0 is greedy (argmax).

  top_k > 0 keeps the k most likely; top_p < 1 keeps the smallest set whose probability
  reaches top_p (always at least the most likely id).
  """
  logits = logits_xV.astype(jnp.float32)
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely ids
    kept = jnp.where(before < top_p, sorted_desc, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class CachedContext:
  """Feeds units (token ids, or chunk rows) through a model's cached core, window-aware.

  `step(cache, units_1xT, seg_1xT, pos_1xT) -> ((out_1xTx..., layers_1xT), cache)`, layers
  being the core layers each unit used (early exit); `prefill` and `feed` return the output
  at the last unit. Positions continue from the cache. Units go in blocks of PREFILL_BLOCK,
  then one at a time, so only two shapes are ever compiled. A full cache is rebuilt from
  the last half of the context. With pause_every = k, `pause_count` pause units follow every
  k-th real unit (as the pause featurizer puts them in training), and `pause(n)` appends n
  more (before a continuation); the output is then read at the last pause.
  """
  PREFILL_BLOCK = 32

  def __init__(self, step_fn, empty_cache, max_len, *, pause_every=0, pause_count=1,
               pause_unit=None):
    self._step, self._empty, self.max_len = step_fn, empty_cache, int(max_len)
    self.units, self.cache, self.n_cached = [], empty_cache, 0
    self.pause_every, self.pause_count, self.pause_unit = (int(pause_every), int(pause_count),
                                                           pause_unit)
    self.n_real = 0
    self.layers_sum, self.units_run = 0.0, 0  # core layers used, over every unit run

  def _run(self, units):
    arr = np.asarray(units, np.int32)[None]
    T = arr.shape[1]
    seg = np.ones((1, T), np.int32)
    pos = (self.n_cached + np.arange(T, dtype=np.int32))[None]
    (out, layers), self.cache = self._step(self.cache, arr, seg, pos)
    self.n_cached += T
    self.layers_sum += float(np.asarray(layers).sum())
    self.units_run += T
    return out[0, -1]

  @property
  def layers_per_unit(self) -> float:
    """Average core layers used per unit run so far (num_layers without early exit)."""
    return self.layers_sum / max(self.units_run, 1)

  def _with_pauses(self, units, first_index):
    out = []
    for i, u in enumerate(units, start=first_index):
      out.append(u)
      if self.pause_every and (i + 1) % self.pause_every == 0:
        out += [self.pause_unit] * self.pause_count
    return out

  def _encode_all(self):
    self.cache, self.n_cached = self._empty, 0
    n, block = len(self.units), min(self.PREFILL_BLOCK, self.max_len)
    out = None
    for s in range(0, n - n % block, block):
      out = self._run(self.units[s:s + block])
    for s in range(n - n % block, n):
      out = self._run(self.units[s:s + 1])
    return out

  def prefill(self, units):
    units = list(units)
    if not units:
      raise ValueError('prefill needs at least one unit (the end-of-text start)')
    self.n_real = len(units)
    units = self._with_pauses(units, 0)
    if len(units) > self.max_len:
      warnings.warn(f'prompt of {len(units)} units is longer than the context '
                    f'(model.max_len={self.max_len}); keeping its last {self.max_len}',
                    ContextTruncated, stacklevel=2)
      units = units[-self.max_len:]
    self.units = units
    return self._encode_all()

  def _append(self, new):
    self.units += new
    if self.n_cached + len(new) > self.max_len:
      keep = max(self.max_len // 2, 1)
      warnings.warn(f'context full ({self.max_len} units): re-encoding the last {keep}',
                    ContextTruncated, stacklevel=2)
      self.units = self.units[-keep:]
      return self._encode_all()
    for u in new:
      out = self._run([u])
    return out

  def feed(self, unit):
    new = self._with_pauses([unit], self.n_real)
    self.n_real += 1
    return self._append(new)

  def pause(self, n: int):
    """Appends n pause units; returns the output at the last one."""
    if n <= 0 or self.pause_unit is None:
      raise ValueError(f'pause({n}) needs n > 0 and a model with pause tokens')
    return self._append([self.pause_unit] * n)


# Jitted functions per model (class + config), so repeated calls compile once.
_JIT_CACHE = {}


def _cached(model, key, build):
  cfg = model.cfg
  plain = cfg.to_dict() if hasattr(cfg, 'to_dict') else repr(cfg)
  ident = (type(model).__name__, json.dumps(plain, sort_keys=True, default=str))
  fns = _JIT_CACHE.setdefault(ident, {})
  if key not in fns:
    fns[key] = build()
  return fns[key]


def _empty_cache(model, method, unit_shape, batch=1):
  """Zeros shaped like the model's decode cache (what `init` would return, no compute)."""
  def init():
    units = jnp.zeros((batch, 1) + unit_shape, jnp.int32)
    ones = jnp.ones((batch, 1), jnp.int32)
    return model.init(jax.random.key(0), units, ones, ones * 0, deterministic=True,
                      decode=True, method=method)['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init))


def _step_fn(model, method):
  def build():
    @jax.jit
    def step(params, cache, units, seg, pos):
      out, mutated = model.apply({'params': params, 'cache': cache}, units, seg, pos,
                                 deterministic=True, decode=True, method=method,
                                 mutable=['cache'])
      return out, mutated['cache']
    return step
  return _cached(model, ('step', method), build)


def _context(model, params, model_cfg, method, unit_shape) -> CachedContext:
  step = _step_fn(model, method)
  empty = _cached(model, ('empty', method), lambda: _empty_cache(model, method, unit_shape))
  every = int(model_cfg.pause_every)
  pause_unit = None
  if every or int(model_cfg.pause_before_continuation):
    pause_unit = pauses.pause_input(np.zeros(unit_shape, np.int32))
    pause_unit = int(pause_unit) if not unit_shape else pause_unit
  return CachedContext(functools.partial(step, params), empty, model_cfg.max_len,
                       pause_every=every, pause_count=int(model_cfg.pause_count),
                       pause_unit=pause_unit)


def chunk_context(model, params, model_cfg) -> CachedContext:
  """The cached core of a chunk model: `core_step_and_layers` outputs for chunk rows."""
  unit_shape = kinds.get_kind(model_cfg.kind).unit_shape(model_cfg)
  return _context(model, params, model_cfg, 'core_step_and_layers', unit_shape)


def token_context(model, params, model_cfg) -> CachedContext:
  """The cached logits (and layers used) of a token model."""
  return _context(model, params, model_cfg, 'logits_and_layers', ())


def chunk_sampler(model, params, width, **sampling):
  """fn (y_D, rng) -> ids [width] of one next chunk, sampled slot by slot (jitted)."""
  def build():
    @functools.partial(jax.jit, static_argnames=('temperature', 'top_k', 'top_p'))
    def sample(params, y_D, rng, **sampling):
      def body(j, carry):
        ids_C, done = carry
        logits = model.apply({'params': params}, y_D[None, None], ids_C[None, None],
                             deterministic=True, method='decode_logits')[0, 0, j]
        s = sample_logits(jax.random.fold_in(rng, j), logits, **sampling)
        s = jnp.where(done, ids.PAD, s)
        done |= (s == ids.END_OF_CHUNK) | (s == ids.EOT)
        return ids_C.at[j].set(s), done
      init = (jnp.zeros((width,), jnp.int32), jnp.zeros((), bool))
      return jax.lax.fori_loop(0, width, body, init)[0]
    return sample
  sample = _cached(model, ('sampler', width), build)
  return lambda y_D, rng: sample(params, y_D, rng, **sampling)


pick_token = jax.jit(lambda rng, logits, **kw: sample_logits(rng, logits, **kw),
                      static_argnames=('temperature', 'top_k', 'top_p'))


def generate_tokens(model, params, model_cfg, tokenizer, data, rng, max_bytes, sampling,
                    stats, emit=None):
  ctx = token_context(model, params, model_cfg)
  logits = ctx.prefill([tokenizer.eot_id] + tokenizer.encode(
      data.decode('utf-8', errors='replace')))
  if model_cfg.pause_before_continuation:
    logits = ctx.pause(model_cfg.pause_before_continuation)
  out = bytearray()
  for i in range(max_bytes):
    token = int(pick_token(jax.random.fold_in(rng, i), logits, **sampling))
    if token == tokenizer.eot_id:
      break
    out += tokenizer.token_bytes(token)
    if len(out) >= max_bytes or (emit is not None and emit(tokenizer.token_bytes(token))):
      break
    logits = ctx.feed(token)
  stats['layers_per_unit'] = ctx.layers_per_unit
  return out


class BatchedContext:
  """B token sequences fed through one KV cache of batch B, as B `CachedContext`s would be.

  Rows are left-padded to a common length (padding has segment id 0, so no real unit ever
  attends to it) and carry their own positions, so each row's outputs are those of its own
  cache. The cache's slots are shared: when they run out, every row is re-encoded from its
  own units (its padding dropped); a row whose own units overflow the context keeps its last
  half, with a warning, exactly when and as `CachedContext` would. Units go in blocks of
  PREFILL_BLOCK, then one at a time, so two shapes are compiled per batch size. Pause tokens
  between units (pause_every) are not supported: a kind with them decodes one at a time.
  """

  def __init__(self, step_fn, empty_cache, max_len, batch):
    self._step, self._empty, self.max_len, self.batch = (step_fn, empty_cache, int(max_len),
                                                         int(batch))
    self.units = [[] for _ in range(self.batch)]   # each live row's units, as its cache holds
    self.live = [True] * self.batch                # finished rows are fed padding only
    self.cache, self.n_slots = empty_cache, 0
    self.layers_sum, self.units_run = 0.0, 0       # over real units only

  @property
  def layers_per_unit(self) -> float:
    return self.layers_sum / max(self.units_run, 1)

  def _run(self, units_BxT, seg_BxT, pos_BxT):
    (out, layers), self.cache = self._step(self.cache, units_BxT, seg_BxT, pos_BxT)
    self.n_slots += units_BxT.shape[1]
    self.layers_sum += float((np.asarray(layers) * seg_BxT).sum())
    self.units_run += int(seg_BxT.sum())
    return out[:, -1]

  def _encode_all(self):
    """Every live row's units, right-aligned in a fresh cache; output at the last slot."""
    lengths = [len(u) if live else 0 for u, live in zip(self.units, self.live)]
    P = max(lengths)
    units_BxP = np.zeros((self.batch, P), np.int32)
    seg_BxP = np.zeros((self.batch, P), np.int32)
    pos_BxP = np.zeros((self.batch, P), np.int32)
    for b, n in enumerate(lengths):
      if n:
        units_BxP[b, P - n:] = self.units[b]
        seg_BxP[b, P - n:] = 1
        pos_BxP[b, P - n:] = np.arange(n)
    self.cache, self.n_slots = self._empty, 0
    block = min(CachedContext.PREFILL_BLOCK, self.max_len)
    out = None
    for s in range(0, P - P % block, block):
      out = self._run(units_BxP[:, s:s + block], seg_BxP[:, s:s + block],
                      pos_BxP[:, s:s + block])
    for s in range(P - P % block, P):
      out = self._run(units_BxP[:, s:s + 1], seg_BxP[:, s:s + 1], pos_BxP[:, s:s + 1])
    return out

  def prefill(self, rows):
    """Starts every row from its units (at least one each); returns the outputs B x ...."""
    if len(rows) != self.batch or not all(rows):
      raise ValueError(f'prefill needs {self.batch} rows of at least one unit each')
    for b, units in enumerate(rows):
      units = list(units)
      if len(units) > self.max_len:
        warnings.warn(f'prompt of {len(units)} units is longer than the context '
                      f'(model.max_len={self.max_len}); keeping its last {self.max_len}',
                      ContextTruncated, stacklevel=2)
        units = units[-self.max_len:]
      self.units[b], self.live[b] = units, True
    return self._encode_all()

  def finish(self, b: int) -> None:
    """Row b is done: it is fed padding from now on."""
    self.live[b], self.units[b] = False, []

  def feed(self, new):
    """Appends new[b] (as many units for every row) to each live row b; outputs at the last.

    Finished rows' entries are ignored."""
    n_new = len(new[0])
    if len(new) != self.batch or any(len(units) != n_new for units in new):
      raise ValueError(f'feed needs {self.batch} rows of {n_new} units each')
    rebuild = self.n_slots + n_new > self.max_len
    for b in range(self.batch):
      if not self.live[b]:
        continue
      if len(self.units[b]) + n_new > self.max_len:
        keep = max(self.max_len // 2, 1)
        warnings.warn(f'context full ({self.max_len} units): re-encoding the last {keep}',
                      ContextTruncated, stacklevel=2)
        self.units[b] = (self.units[b] + list(new[b]))[-keep:]
        rebuild = True
      else:
        self.units[b] = self.units[b] + list(new[b])
    if rebuild:
      return self._encode_all()
    live_B = np.asarray(self.live, np.int32)[:, None]
    out = None
    for j in range(n_new):
      units_Bx1 = np.asarray([[new[b][j] if self.live[b] else 0] for b in range(self.batch)],
                             np.int32)
      pos_Bx1 = np.asarray([[len(u) - n_new + j] for u in self.units], np.int32) * live_B
      out = self._run(units_Bx1, live_B, pos_Bx1)
    return out


def token_batch_context(model, params, model_cfg, batch: int) -> BatchedContext:
  """The cached logits of a token model for `batch` rows at once."""
  method = 'logits_and_layers'
  empty = _cached(model, ('empty', method, batch),
                  lambda: _empty_cache(model, method, (), batch))
  return BatchedContext(functools.partial(_step_fn(model, method), params), empty,
                        model_cfg.max_len, batch)


# Each row samples as `pick_token` would alone: the key is shared, not split over rows.
@functools.partial(jax.jit, static_argnames=('temperature', 'top_k', 'top_p'))
def pick_tokens(rng, logits_BxV, **sampling):
  return jax.vmap(lambda l: sample_logits(rng, l, **sampling))(logits_BxV)


def generate_tokens_batched(model, params, model_cfg, tokenizer, prompts, rng, max_bytes,
                            sampling, stats, stops=(), max_units=None):
  """The batched strategy of token kinds: all prompts decoded together in one KV cache.

  Row b's result is `generate_tokens` of prompts[b] alone with the same rng (cut at its first
  stop sequence): the rows sample the same keys step by step, and a row that ends (end of
  text, max_bytes, a stop sequence) is frozen while the others go on. Models with pause
  tokens between units (model.pause_every) decode one at a time (`one_at_a_time`), since
  their rows would need pauses at different steps; pauses before the continuation are fed
  to every row at once.
  """
  if int(model_cfg.pause_every):
    return one_at_a_time(generate_tokens)(model, params, model_cfg, tokenizer, prompts, rng,
                                          max_bytes, sampling, stats, stops, max_units)
  if not prompts:
    return []
  ctx = token_batch_context(model, params, model_cfg, len(prompts))
  logits_BxV = ctx.prefill([[tokenizer.eot_id] + tokenizer.encode(
      p.decode('utf-8', errors='replace')) for p in prompts])
  n_pause = int(model_cfg.pause_before_continuation)
  if n_pause:
    pause_unit = int(pauses.pause_input(np.zeros((), np.int32)))
    logits_BxV = ctx.feed([[pause_unit] * n_pause] * len(prompts))
  outs = [bytearray() for _ in prompts]
  steps = max_bytes if max_units is None else min(max_bytes, int(max_units))
  for i in range(steps):
    tokens_B = np.asarray(pick_tokens(jax.random.fold_in(rng, i), logits_BxV, **sampling))
    for b, token in enumerate(tokens_B.tolist()):
      if not ctx.live[b]:
        continue
      if token != tokenizer.eot_id:
        outs[b] += tokenizer.token_bytes(token)
      if (token == tokenizer.eot_id or len(outs[b]) >= max_bytes
          or cut_at_stop(bytes(outs[b]), stops) != outs[b]):
        ctx.finish(b)
    if not any(ctx.live) or i + 1 == steps:
      break
    logits_BxV = ctx.feed([[int(t)] for t in tokens_B])
  stats['layers_per_unit'] = ctx.layers_per_unit
  return [cut_at_stop(bytes(out[:max_bytes]), stops) for out in outs]


def one_at_a_time(strategy):
  """A batched strategy that runs the single-sequence `strategy` on each prompt in turn.

  Equal prompts are generated once (same prompt, same rng: the same result).
  """
  def batched(model, params, model_cfg, tokenizer, prompts, rng, max_bytes, sampling, stats,
              stops=(), max_units=None):
    done, layers = {}, []
    for prompt in prompts:
      if prompt in done:
        continue
      buf = bytearray()

      def emit(new, buf=buf):
        buf += new
        return cut_at_stop(bytes(buf), stops) != buf
      row_stats = {}
      out = strategy(model, params, model_cfg, tokenizer, prompt, rng, max_bytes, sampling,
                     row_stats, emit=unit_limit(emit if stops else None, max_units))
      done[prompt] = cut_at_stop(bytes(out[:max_bytes]), stops)
      layers.append(row_stats.get('layers_per_unit', float(model_cfg.num_layers)))
    stats['layers_per_unit'] = float(np.mean(layers)) if layers else 0.0
    return [done[p] for p in prompts]
  return batched
