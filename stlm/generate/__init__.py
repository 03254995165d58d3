"""Text generation from an export, for every model kind that generates.

  python -m stlm.generate --checkpoint=<workdir>/export --prompt="Once upon a time"

The loop is the model kind's `generation` strategy (stlm/models/kinds.py): token by token
with a KV cache for token kinds (stlm/models/decoding.py), chunk by chunk or symbol by symbol
for the byte-pool versions (stlm/models/byte_pool/). Every strategy stops at end-of-text or
after max_bytes bytes.
"""

import sys

from absl import app
import jax

from stlm import cli_errors
from stlm import export
from stlm.models import decoding
from stlm.models import kinds

ContextTruncated = decoding.ContextTruncated


def prompt_bytes(prompt) -> bytes:
  """UTF-8 of a prompt; bytes pass through, undecodable argv bytes (surrogates) survive."""
  if not isinstance(prompt, str):
    return bytes(prompt)
  try:
    return prompt.encode('utf-8', errors='surrogateescape')
  except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
    return prompt.encode('utf-8', errors='replace')


def generate(model, params, config, tokenizer, prompt: str, *, max_bytes=256, temperature=0.0,
             top_k=0, top_p=1.0, seed=0, stats: dict | None = None) -> bytes:
  """The bytes generated after `prompt` (at most max_bytes; stops at end-of-text).

  `stats`, when given, receives `layers_per_unit`: the core layers each unit (prompt and
  generated, pauses included) used on average; below model.num_layers under early exit.
  """
  sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  strategy = kinds.get_kind(config.model.kind).generation
  if strategy is None:
    raise ValueError(f'model.kind {config.model.kind!r} does not generate text')
  out = strategy(model, params, config.model, tokenizer, prompt_bytes(prompt),
                 jax.random.key(seed), max_bytes, sampling, {} if stats is None else stats)
  return bytes(out[:max_bytes])


def generate_text(exported, prompt: str, **kwargs) -> str:
  """`generate` on a `stlm.export.load_export` result, decoded (bad bytes -> U+FFFD)."""
  data = generate(exported.model, exported.params, exported.config, exported.tokenizer,
                  prompt, **kwargs)
  return data.decode('utf-8', errors='replace')


def run(checkpoint, prompt='', max_bytes=256, temperature=0.8, top_k=0, top_p=1.0, seed=0):
  """Loads the export, prints prompt + continuation, returns the continuation."""
  if not checkpoint:
    raise app.UsageError('--checkpoint=<workdir>/export is required')
  if not prompt:
    # Most often an unset shell variable; a sample from nothing is rarely what was meant.
    raise cli_errors.FlagError('--prompt is empty: give the text to continue')
  if max_bytes < 1:
    raise cli_errors.FlagError(f'--max_bytes={max_bytes} must be >= 1')
  if not 0.0 < top_p <= 1.0 or top_k < 0 or temperature < 0:
    raise cli_errors.FlagError(f'need --temperature >= 0, --top_k >= 0 and 0 < --top_p <= 1 '
                               f'(got {temperature}, {top_k}, {top_p})')
  config = export.check_export(checkpoint, '--checkpoint')
  if kinds.get_kind(config.model.kind).generation is None:
    raise export.BadExportError(f'--checkpoint={checkpoint} holds a model.kind='
                                f'{config.model.kind!r} model, which does not generate text')
  exported = export.load_export(checkpoint, '--checkpoint')
  stats = {}
  text = generate_text(exported, prompt, max_bytes=max_bytes, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed, stats=stats)
  if float(exported.config.model.early_exit_threshold) > 0:
    print(f'early exit: {stats["layers_per_unit"]:.2f} of {exported.config.model.num_layers} '
          'core layers per unit on average', file=sys.stderr)
  out = prompt + text + '\n'
  # Encoded by hand so a non-UTF-8 terminal (LANG=C) or stray surrogates cannot crash it.
  if hasattr(sys.stdout, 'buffer'):
    sys.stdout.flush()
    sys.stdout.buffer.write(out.encode('utf-8', errors='replace'))
    sys.stdout.buffer.flush()
  else:
    sys.stdout.write(out.encode('utf-8', errors='replace').decode('utf-8'))
  return text
