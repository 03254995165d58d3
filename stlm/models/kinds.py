"""The model-kind registry: everything the rest of stlm needs to know about a model kind.

A kind (`config.model.kind`) is described ONCE, by a `ModelKind` registered from its own
module (`stlm/models/baseline.py`, `stlm/models/byte_pool/paper.py`). The factory, trainer,
metrics, generation, evaluation and benchmarks ask the registry; none of them branches on a
kind's name. A new kind is one module that calls `register_kind` plus one line in
`_KIND_MODULES`; its featurizer is registered where data lives
(`stlm.data.featurize.register_featurizer`, under the kind's `featurizer` name) and its
generation strategies are its `generation` and `batched_generation` fields (built on
stlm/models/decoding.py), so this package still imports no data code.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from stlm.models import model_config

# Modules that register the built-in kinds when imported (lazily: registering imports the
# model code, and the registry must be importable from that code without a cycle).
_KIND_MODULES = ('stlm.models.baseline', 'stlm.models.byte_pool.kind',
                 'stlm.models.encoder')

Batch = dict[str, np.ndarray]


def _no_report(params, model_cfg) -> str | None:
  del params, model_cfg
  return None


def _no_checks(model_cfg) -> None:
  del model_cfg


@dataclasses.dataclass(frozen=True)
class Scoring:
  """Scorer fast paths a model supports (for one `config.model`).

  gather: the model accepts `batch['score_idx']` (int32 B x K, row positions) and then
    returns `logprobs` and `greedy` of shape B x K for those positions only, running the
    output layer at K positions instead of T (a kind whose head is small, or whose outputs
    at a position need the others', leaves it False).
  pack: the scores of a request do not depend on other requests in its row when the rows
    carry one segment id per request and positions restarting at 0 (attention masked by
    segment, nothing pooled or routed across a row), so the scorer may pack several short
    requests per row.
  """
  gather: bool = False
  pack: bool = False


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """One model kind. Every callable takes the `config.model` section as `model_cfg`.

  name: the value of `config.model.kind`.
  build(model_cfg) -> nn.Module: the LM (see docs/architecture.md for its output contract).
  unit_shape(model_cfg) -> tuple: trailing shape of one input/target unit beyond B x T:
    () for a token id, (C,) for a chunk row of C byte slots.
  dummy_batch(model_cfg, batch_size, seq_len) -> dict of numpy: a batch of the kind's layout
    (zeros; for init and shape inference, no device work).
  synthetic_batch(model_cfg, rng: np.random.Generator, leading_shape) -> dict of numpy:
    random real ids in every target (no padding), arrays shaped leading_shape + (T, ...) with
    T = model_cfg.max_len; for benchmarks.
  param_breakdown(params, model_cfg) -> dict(embedding, head, core, total, tied, ...):
    parameters by role (boxed or unboxed params, arrays or ShapeDtypeStructs).
  flops_per_target(model_cfg, breakdown) -> float: training FLOPs (forward + backward) per
    target; counts compute per layer, so weights applied in several layers count each time.
  validate(model_cfg): kind-specific checks; raises `stlm.config_errors.ConfigError` naming
    the key.
  target_unit: what one target is, 'tokens' | 'chunks' (progress bar and log labels).
  featurizer(config, tokenizer) -> featurizer: text -> examples (stlm/data/featurize.py's
    interface); `stlm.models.factory.make_featurizer` adds pause tokens when asked for.
  generation: the generation strategy (stlm/models/decoding.py's signature), or None for a
    kind that does not generate text.
  batched_generation: the batched strategy (several prompts at once, same results as
    `generation` of each alone; stlm/models/decoding.py's signature): the kind's own, or
    `decoding.one_at_a_time(generation)`; None exactly when `generation` is None.
  param_report(params, model_cfg) -> str | None: extra start-up lines, or None.
  reports_bits_per_byte: whether nll / bytes of the targets is a language-modelling bits per
    byte (False for masked-LM kinds: their targets are a sample of the text, predicted from
    both sides, so the ratio measures nothing; they report loss and `stats` accuracy).
  causal: whether position t sees only positions <= t (then a sequence summary for
    classification is the last position; bidirectional kinds pool the first or the mean).
  config_sections: the config sections this kind owns (e.g. 'model.byte_pool'): no other
    kind reads them, so a run of another kind may resume over a checkpoint whose config
    differs only there (`foreign_config_sections`).
  scoring(model_cfg) -> Scoring: what the log-likelihood scorer (stlm/eval/scorer.py) may
    ask of this kind's model beyond the plain forward; default: nothing (one request per
    row, every position through the output layer).
  """
  name: str
  build: Callable[[Any], nn.Module]
  unit_shape: Callable[[Any], tuple[int, ...]]
  dummy_batch: Callable[[Any, int, int], Batch]
  synthetic_batch: Callable[[Any, np.random.Generator, tuple[int, ...]], Batch]
  param_breakdown: Callable[[Any, Any], dict[str, Any]]
  flops_per_target: Callable[[Any, dict[str, Any]], float]
  target_unit: str
  featurizer: Callable[[Any, Any], Any]
  generation: Callable[..., bytes] | None
  batched_generation: Callable[..., list[bytes]] | None = None
  validate: Callable[[Any], None] = _no_checks
  param_report: Callable[[Any, Any], str | None] = _no_report
  reports_bits_per_byte: bool = True
  causal: bool = True
  scoring: Callable[[Any], 'Scoring'] = lambda model_cfg: Scoring()
  config_sections: tuple[str, ...] = ()


_REGISTRY: dict[str, ModelKind] = {}
_loaded = False
_missing: dict[str, str] = {}   # kind module -> why it could not be imported


# The argument of each ModelKind callable that is the model config: register_kind makes it
# the typed `model_config.ModelConfig` on the way in, whatever the caller passes.
_MODEL_CFG_ARG = dict(build=0, unit_shape=0, dummy_batch=0, synthetic_batch=0,
                      flops_per_target=0, validate=0, scoring=0, param_breakdown=1,
                      param_report=1, generation=2,
                      batched_generation=2)


def _typed(fn, index: int):
  @functools.wraps(fn)
  def call(*args, **kwargs):
    args = list(args)
    args[index] = model_config.of(args[index])
    return fn(*args, **kwargs)
  return call


def register_kind(kind: ModelKind) -> ModelKind:
  """Adds `kind` (a module registers its kind at import); re-registering replaces it.

  Returns the registered description, whose callables take the model config in any form
  (`config.model` ConfigDict or `model_config.ModelConfig`) and pass it on typed."""
  if not isinstance(kind, ModelKind):
    raise TypeError(f'register_kind needs a ModelKind, got {type(kind).__name__}')
  if (kind.generation is None) != (kind.batched_generation is None):
    raise ValueError(f'kind {kind.name!r}: give both generation and batched_generation '
                     '(decoding.one_at_a_time(generation) runs prompts in turn), or neither')
  kind = dataclasses.replace(kind, **{
      name: _typed(getattr(kind, name), index) for name, index in _MODEL_CFG_ARG.items()
      if getattr(kind, name) is not None})
  _REGISTRY[kind.name] = kind
  return kind


def _load_builtin() -> None:
  global _loaded
  if _loaded:
    return
  _loaded = True
  for module in _KIND_MODULES:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      # The module or its package is absent (anything else missing is a real error): a
      # checkout without this kind's files still runs the other kinds.
      if e.name != module and not module.startswith(f'{e.name}.'):
        raise
      own = '/'.join(module.split('.')[:3])   # the kind's module or package in stlm/models
      _missing[module] = f'{own}.py' if own.count('/') == module.count('.') else \
          f'{own}.py or {own}/'


def kind_names() -> tuple[str, ...]:
  """Every registered kind's name, sorted (registration order depends on which module a
  program happens to import first)."""
  _load_builtin()
  return tuple(sorted(_REGISTRY))


def get_kind(name: str) -> ModelKind:
  """The registered kind `name`; an unknown name raises ValueError listing the known ones."""
  _load_builtin()
  if name not in _REGISTRY:
    if _missing:
      raise ImportError(f'model.kind {name!r} is not registered (known: '
                        f'{", ".join(kind_names())}); these kind modules are not present in this '
                        f'checkout: {", ".join(_missing.values())}')
    raise ValueError(f'model.kind {name!r} unknown; choose one of {", ".join(kind_names())}')
  return _REGISTRY[name]


def foreign_config_sections(name: str) -> tuple[str, ...]:
  """Key prefixes ('model.byte_pool.') of the sections other kinds own and `name` does not
  read: what a run of kind `name` ignores when it compares configs."""
  own = set(get_kind(name).config_sections)
  return tuple(sorted({f'{section}.' for kind in _REGISTRY.values() if kind.name != name
                       for section in kind.config_sections if section not in own}))


# Helpers shared by the kinds' descriptions.


def layout_batch(model_cfg, unit_shape: tuple[int, ...], batch_size: int,
                 seq_len: int | None = None) -> Batch:
  """Zeros in the batch layout of docs/architecture.md (every target real, one segment)."""
  T = seq_len or min(model_cfg.max_len, 16)
  shape = (batch_size, T)
  return dict(
      inputs=np.zeros(shape + tuple(unit_shape), np.int32),
      targets=np.zeros(shape + tuple(unit_shape), np.int32),
      segment_ids=np.ones(shape, np.int32),
      positions=np.broadcast_to(np.arange(T, dtype=np.int32), shape).copy(),
      loss_mask=np.ones(shape, np.float32),
      target_bytes=np.ones(shape, np.int32),
  )


def random_batch(model_cfg, unit_shape, rng: np.random.Generator, leading_shape,
                 low: int, high: int) -> Batch:
  """`layout_batch` with ids uniform in [low, high) and targets = inputs shifted by one."""
  leading_shape = tuple(leading_shape)
  T = model_cfg.max_len
  base = layout_batch(model_cfg, unit_shape, 1, T)
  batch = {k: np.broadcast_to(v[0], leading_shape + v.shape[1:]).copy() for k, v in base.items()}
  ids = rng.integers(low, high, leading_shape + (T,) + tuple(unit_shape)).astype(np.int32)
  batch.update(inputs=ids, targets=np.roll(ids, -1, axis=len(leading_shape)))
  return batch


def attention_flops_per_target(model_cfg) -> float:
  """Training FLOPs of the core's attention scores and mixing per target (causal: half)."""
  m = model_cfg
  return 12 * m.num_layers * m.max_len * m.hidden_dim / 2


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays, ShapeDtypeStructs or boxed params."""
  return int(sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(nn.unbox(tree))))
