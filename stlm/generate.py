"""Text generation from an export, for both model kinds, with a cached core.

  python -m stlm.generate --checkpoint=<workdir>/export --prompt="Once upon a time"

The model kind's registered `generation` strategy (stlm/models/kinds.py) picks the loop:
'tokens': token by token with the KV cache (the model's `logits(..., decode=True)`).
'chunks': chunk by chunk: the core runs once per new chunk on its KV cache (the prefix is
never recomputed, `core_step`), then the byte decoder (`decode_logits`) writes the next
chunk's bytes one at a time until END_OF_CHUNK.
Both stop at end-of-text or after --max_bytes bytes. A prompt longer than the context keeps
its last max_len units (with a warning); when the cache fills during generation the last half
of the context is re-encoded into a fresh cache (also warned).
"""

import functools
import json
import sys
import warnings

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np

from stlm.data import chunking
from stlm.models import kinds


class ContextTruncated(UserWarning):
  """The prompt or the generated text no longer fits the model's context."""


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

  `step(cache, units_1xT, seg_1xT, pos_1xT) -> (out_1xTx..., cache)`; `prefill` and `feed`
  return the output at the last unit. Positions continue from the cache. Units go in
  blocks of PREFILL_BLOCK, then one at a time, so only two shapes are ever compiled.
  A full cache is rebuilt from the last half of the context.
  """
  PREFILL_BLOCK = 32

  def __init__(self, step_fn, empty_cache, max_len):
    self._step, self._empty, self.max_len = step_fn, empty_cache, int(max_len)
    self.units, self.cache, self.n_cached = [], empty_cache, 0

  def _run(self, units):
    arr = np.asarray(units, np.int32)[None]
    T = arr.shape[1]
    seg = np.ones((1, T), np.int32)
    pos = (self.n_cached + np.arange(T, dtype=np.int32))[None]
    out, self.cache = self._step(self.cache, arr, seg, pos)
    self.n_cached += T
    return out[0, -1]

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
    if len(units) > self.max_len:
      warnings.warn(f'prompt of {len(units)} units is longer than the context '
                    f'(model.max_len={self.max_len}); keeping its last {self.max_len}',
                    ContextTruncated, stacklevel=2)
      units = units[-self.max_len:]
    self.units = units
    return self._encode_all()

  def feed(self, unit):
    self.units.append(unit)
    if self.n_cached + 1 > self.max_len:
      keep = max(self.max_len // 2, 1)
      warnings.warn(f'context full ({self.max_len} units): re-encoding the last {keep}',
                    ContextTruncated, stacklevel=2)
      self.units = self.units[-keep:]
      return self._encode_all()
    return self._run([unit])


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


def _empty_cache(model, method, unit_shape):
  """Zeros shaped like the model's decode cache (what `init` would return, no compute)."""
  def init():
    units = jnp.zeros((1, 1) + unit_shape, jnp.int32)
    ones = jnp.ones((1, 1), jnp.int32)
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
  return CachedContext(functools.partial(step, params), empty, model_cfg.max_len)


def chunk_context(model, params, model_cfg) -> CachedContext:
  """The cached core of a chunk model: `core_step` outputs for chunk rows."""
  unit_shape = kinds.get_kind(model_cfg.kind).unit_shape(model_cfg)
  return _context(model, params, model_cfg, 'core_step', unit_shape)


def token_context(model, params, model_cfg) -> CachedContext:
  """The cached logits of a token model."""
  return _context(model, params, model_cfg, 'logits', ())


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
        s = jnp.where(done, chunking.PAD, s)
        done |= (s == chunking.END_OF_CHUNK) | (s == chunking.EOT)
        return ids_C.at[j].set(s), done
      init = (jnp.zeros((width,), jnp.int32), jnp.zeros((), bool))
      return jax.lax.fori_loop(0, width, body, init)[0]
    return sample
  sample = _cached(model, ('sampler', width), build)
  return lambda y_D, rng: sample(params, y_D, rng, **sampling)


_pick_token = jax.jit(lambda rng, logits, **kw: sample_logits(rng, logits, **kw),
                      static_argnames=('temperature', 'top_k', 'top_p'))


def prompt_bytes(prompt) -> bytes:
  """UTF-8 of a prompt; bytes pass through, undecodable argv bytes (surrogates) survive."""
  if not isinstance(prompt, str):
    return bytes(prompt)
  try:
    return prompt.encode('utf-8', errors='surrogateescape')
  except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
    return prompt.encode('utf-8', errors='replace')


def _generate_chunks(model, params, model_cfg, tokenizer, data, rng, max_bytes, sampling):
  (width,) = kinds.get_kind(model_cfg.kind).unit_shape(model_cfg)
  max_chunk = width - 1  # one slot is END_OF_CHUNK's
  rows, _ = chunking.encode_chunks(chunking.chunk_bytes(data, tokenizer, max_chunk), width,
                                   end_of_chunk=False)
  eot_row = np.zeros((1, width), np.int32)
  eot_row[0, 0] = chunking.EOT
  ctx = chunk_context(model, params, model_cfg)
  sampler = chunk_sampler(model, params, width, **sampling)
  y = ctx.prefill(list(np.concatenate([eot_row, rows])))
  out = bytearray()
  for i in range(max_bytes):  # every chunk adds >= 1 byte
    ids = np.asarray(sampler(y, jax.random.fold_in(rng, i)))
    chunk, is_eot = chunking.decode_chunk_ids(ids)
    if is_eot:
      break
    out += chunk
    if len(out) >= max_bytes:
      break
    row, _ = chunking.encode_chunks([chunk], width, end_of_chunk=False)
    y = ctx.feed(row[0])
  return out


def _generate_tokens(model, params, model_cfg, tokenizer, data, rng, max_bytes, sampling):
  ctx = token_context(model, params, model_cfg)
  logits = ctx.prefill([tokenizer.eot_id] + tokenizer.encode(
      data.decode('utf-8', errors='replace')))
  out = bytearray()
  for i in range(max_bytes):
    token = int(_pick_token(jax.random.fold_in(rng, i), logits, **sampling))
    if token == tokenizer.eot_id:
      break
    out += tokenizer.token_bytes(token)
    if len(out) >= max_bytes:
      break
    logits = ctx.feed(token)
  return out


# Generation strategies by name (a model kind's `generation` field names one):
# fn(model, params, model_cfg, tokenizer, prompt bytes, rng, max_bytes, sampling) -> bytes.
GENERATORS = {'tokens': _generate_tokens, 'chunks': _generate_chunks}


def generate(model, params, config, tokenizer, prompt: str, *, max_bytes=256, temperature=0.0,
             top_k=0, top_p=1.0, seed=0) -> bytes:
  """The bytes generated after `prompt` (at most max_bytes; stops at end-of-text)."""
  sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  name = kinds.get_kind(config.model.kind).generation
  if name not in GENERATORS:
    raise ValueError(f'model.kind {config.model.kind!r} names generation strategy {name!r}; '
                     f'stlm.generate knows {", ".join(GENERATORS)}')
  out = GENERATORS[name](model, params, config.model, tokenizer, prompt_bytes(prompt),
                         jax.random.key(seed), max_bytes, sampling)
  return bytes(out[:max_bytes])


def generate_text(exported, prompt: str, **kwargs) -> str:
  """`generate` on a `stlm.export.load_export` result, decoded (bad bytes -> U+FFFD)."""
  data = generate(exported.model, exported.params, exported.config, exported.tokenizer,
                  prompt, **kwargs)
  return data.decode('utf-8', errors='replace')


def define_flags(flag_values=flags.FLAGS) -> dict:
  """The CLI's flags; defined only when run as a program (stlm.eval has --checkpoint too)."""
  fv = dict(flag_values=flag_values)
  return dict(
      checkpoint=flags.DEFINE_string('checkpoint', None, '<workdir>/export of a training run.',
                                     **fv),
      prompt=flags.DEFINE_string('prompt', '', 'Text to continue (any script; may be empty).',
                                 **fv),
      max_bytes=flags.DEFINE_integer('max_bytes', 256, 'Stop after this many generated bytes.',
                                     **fv),
      temperature=flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 = greedy.',
                                     **fv),
      top_k=flags.DEFINE_integer('top_k', 0, 'Keep the k most likely symbols (0 = all).', **fv),
      top_p=flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1 = off).', **fv),
      seed=flags.DEFINE_integer('seed', 0, 'Sampling seed.', **fv))


def run(checkpoint, prompt='', max_bytes=256, temperature=0.8, top_k=0, top_p=1.0, seed=0):
  """Loads the export, prints prompt + continuation, returns the continuation."""
  from stlm import export  # pylint: disable=g-import-not-at-top
  if not checkpoint:
    raise app.UsageError('--checkpoint=<workdir>/export is required')
  if max_bytes < 1:
    raise app.UsageError(f'--max_bytes must be >= 1, got {max_bytes}')
  if not 0.0 < top_p <= 1.0 or top_k < 0 or temperature < 0:
    raise app.UsageError('need --temperature >= 0, --top_k >= 0 and 0 < --top_p <= 1')
  text = generate_text(export.load_export(checkpoint), prompt, max_bytes=max_bytes,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
  out = prompt + text + '\n'
  # Encoded by hand so a non-UTF-8 terminal (LANG=C) or stray surrogates cannot crash it.
  if hasattr(sys.stdout, 'buffer'):
    sys.stdout.flush()
    sys.stdout.buffer.write(out.encode('utf-8', errors='replace'))
    sys.stdout.buffer.flush()
  else:
    sys.stdout.write(out.encode('utf-8', errors='replace').decode('utf-8'))
  return text


_FLAGS = {}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every restored file at INFO
  run(**{name: holder.value for name, holder in _FLAGS.items()})


if __name__ == '__main__':
  _FLAGS.update(define_flags())
  app.run(main)
