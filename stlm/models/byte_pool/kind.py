"""The byte-pool model kind: bytes pooled per BPE chunk into the core, decoded into bytes.

`model.byte_pool.version` picks one of two layouts, each a `Version` of `VERSIONS` (this is
the only place that dispatches on it):
  paper: each position is a chunk row of byte slots (paper.py, stlm/data/chunking.py);
  v2:    a ragged byte stream with local sliding-window models (v2.py, v2_kind.py,
         stlm/data/byte_stream.py).
Both share the parameter accounting (params.py) and the key checks below.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn

from stlm.config import errors as config_errors
from stlm.data import byte_stream
from stlm.data import chunking
from stlm.models import decoding
from stlm.models import kinds
from stlm.models import weight_sharing as sharing
from stlm.models.byte_pool import paper
from stlm.models.byte_pool import paper_generation
from stlm.models.byte_pool import params as params_lib
from stlm.models.byte_pool import v2
from stlm.models.byte_pool import v2_generation
from stlm.models.byte_pool import v2_kind


@dataclasses.dataclass(frozen=True)
class Version:
  """What differs between the byte-pool layouts; fields as in `kinds.ModelKind`."""
  build: Callable[[Any], nn.Module]
  dummy_batch: Callable[..., kinds.Batch]
  synthetic_batch: Callable[..., kinds.Batch]
  flops_per_target: Callable[[Any, dict], float]
  validate: Callable[[Any], None]
  featurizer: Callable[[Any, Any], Any]
  generation: Callable[..., bytes]


VERSIONS = {
    'paper': Version(build=paper.BytePoolLM, dummy_batch=paper.dummy_batch,
                     synthetic_batch=paper.synthetic_batch,
                     flops_per_target=paper.flops_per_target, validate=paper.validate,
                     featurizer=chunking.make_chunk_featurizer,
                     generation=paper_generation.generate_chunks),
    'v2': Version(build=v2.BytePoolV2LM, dummy_batch=v2_kind.dummy_batch,
                  synthetic_batch=v2_kind.synthetic_batch,
                  flops_per_target=v2_kind.flops_per_target, validate=v2_kind.validate,
                  featurizer=byte_stream.make_stream_featurizer,
                  generation=v2_generation.generate_stream),
}


def version(model_cfg) -> Version:
  return VERSIONS[model_cfg.byte_pool.version]


def validate(model_cfg) -> None:
  """The keys of both versions (chunk size, heads dividing byte_dim), then the version's."""
  b = model_cfg.byte_pool
  if b.version not in VERSIONS:
    config_errors.fail('model.byte_pool.version', b.version,
                       f'unknown value; choose one of {", ".join(VERSIONS)}')
  if b.max_bytes_per_chunk < 1:
    config_errors.fail('model.byte_pool.max_bytes_per_chunk', b.max_bytes_per_chunk,
                       'must be >= 1')
  for enc in ('encoder', 'decoder'):
    heads = b[f'{enc}_heads']
    if b.byte_dim % heads:
      config_errors.fail(f'model.byte_pool.{enc}_heads', heads,
                         f'does not divide model.byte_pool.byte_dim={b.byte_dim}')
  version(model_cfg).validate(model_cfg)


def _generation(model, params, model_cfg, *args, **kwargs):
  return version(model_cfg).generation(model, params, model_cfg, *args, **kwargs)


KIND = kinds.register_kind(kinds.ModelKind(
    name='byte_pool',
    build=lambda m: version(m).build(m),
    unit_shape=paper.unit_shape,   # the paper layout's chunk rows (v2 streams have no unit width)
    dummy_batch=lambda m, *a: version(m).dummy_batch(m, *a),
    synthetic_batch=lambda m, rng, shape: version(m).synthetic_batch(m, rng, shape),
    param_breakdown=params_lib.param_breakdown,
    flops_per_target=lambda m, breakdown: version(m).flops_per_target(m, breakdown),
    target_unit='chunks',
    featurizer=lambda config, tokenizer: version(config.model).featurizer(config, tokenizer),
    generation=_generation,
    # Chunk and symbol decoding keep per-row state of their own: prompts run in turn.
    batched_generation=decoding.one_at_a_time(_generation),
    validate=validate,
    # Neither scorer fast path: the byte heads are small (a few hundred wide, so gathering
    # saves little), and the v2 streams have a row layout of their own (batch_spans).
    scoring=lambda model_cfg: kinds.Scoring(),
    param_report=lambda params, model_cfg: '\n'.join(filter(None, [
        params_lib.format_param_report(params_lib.param_report(params, model_cfg)),
        sharing.report(nn.unbox(params)['core'], model_cfg)])),
    config_sections=('model.byte_pool',),
))

