"""Post-training compression of an export: `python -m stlm.compress` (see __main__.py).

Three methods, applied in this order to the arrays they select:
- magnitude pruning to an exact sparsity, each array on its own or all together (prune.py);
- low-rank factorisation of chosen matrices, to a rank or an energy target (low_rank.py);
- storage as bfloat16, or as int8 / int4 with per-channel or per-group scales (stlm/export/quantize.py).

What may be compressed: every array of two or more axes (kernels, embedding tables); vectors
(norm scales, biases) stay float32 except under bfloat16. Lookup tables (`embedding`,
`*_embedding`, `ngram_*` params) are "embeddings", or "byte tables" under a top-level
`byte_*` module (the byte-pool model's byte embeddings and n-gram tables); each group can be
left out of every method. A table is quantised with one scale per row (its rows are read one
at a time), every other matrix with one scale per output column.

The output is an export in its own right (stored form in codec.py), loaded through
`stlm.export.load_export` and dequantised there; with every method off it is the input's
files unchanged. `compression.json` records what was done; `artifact_size.json` its size.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
import tempfile

from flax import traverse_util
import numpy as np

from stlm import cli_errors
from stlm import export as export_lib
from stlm.compress import artifact
from stlm.export import codec
from stlm.compress import low_rank as low_rank_lib
from stlm.compress import prune as prune_lib

QUANTIZE = ('none', 'bf16', 'int8', 'int4')
BITS = {'int8': 8, 'int4': 4}
SCOPES = prune_lib.SCOPES
# Files of the source export copied as they are (the params are rewritten unless nothing is
# to be done).
_COPIED = (export_lib.CONFIG_FILE, export_lib.SP_MODEL_FILE)


@dataclasses.dataclass(frozen=True)
class Settings:
  quantize: str = 'none'            # one of QUANTIZE
  group_size: int = 0               # rows per scale; 0: one scale per channel
  embeddings: bool = True           # compress the token embedding tables too
  byte_tables: bool = True          # compress the byte-pool byte tables too
  prune: float = 0.0                # fraction of the selected weights zeroed, in [0, 1)
  prune_scope: str = 'layer'        # one of SCOPES
  low_rank: tuple[str, ...] = ()    # fnmatch patterns of param paths ('a/b/c') to factor
  rank: int | None = None
  energy: float | None = None

  @property
  def is_identity(self) -> bool:
    return self.quantize == 'none' and self.prune == 0 and not self.low_rank

  def check(self) -> None:
    """FlagError naming the flag of a setting that cannot work."""
    if self.quantize not in QUANTIZE:
      raise cli_errors.FlagError(f'--quantize={self.quantize}: unknown method; choose from '
                                 f'{", ".join(QUANTIZE)}')
    if self.group_size < 0:
      raise cli_errors.FlagError(f'--group_size={self.group_size} must be >= 0 (0: one scale '
                                 'per channel)')
    if self.group_size and self.quantize not in BITS:
      raise cli_errors.FlagError(f'--group_size={self.group_size} needs --quantize=int8 or '
                                 f'int4 (it is {self.quantize})')
    if not 0 <= self.prune < 1:
      raise cli_errors.FlagError(f'--prune={self.prune} must be in [0, 1) (the fraction of '
                                 'weights zeroed)')
    if self.prune_scope not in SCOPES:
      raise cli_errors.FlagError(f'--prune_scope={self.prune_scope}: choose from '
                                 f'{", ".join(SCOPES)}')
    if self.rank is not None and self.rank <= 0:
      raise cli_errors.FlagError(f'--rank={self.rank} must be >= 1')
    if self.energy is not None and not 0 < self.energy <= 1:
      raise cli_errors.FlagError(f'--energy={self.energy} must be in (0, 1]')
    if self.low_rank and (self.rank is None) == (self.energy is None):
      raise cli_errors.FlagError(f'--low_rank={",".join(self.low_rank)} needs exactly one of '
                                 '--rank and --energy')
    if not self.low_rank and (self.rank is not None or self.energy is not None):
      flag = '--rank' if self.rank is not None else '--energy'
      raise cli_errors.FlagError(f'{flag} needs --low_rank=<patterns of the matrices to '
                                 'factor>')

  def label(self) -> str:
    """A short name for tables and plots, e.g. 'int4 g64', 'prune 50% + int8'."""
    parts = []
    if self.prune:
      parts.append(f'prune {100 * self.prune:g}%' + (' global' if self.prune_scope == 'global'
                                                     else ''))
    if self.low_rank:
      target = f'r{self.rank}' if self.rank is not None else f'energy {self.energy:g}'
      parts.append(f'low-rank {target}' + ('' if self.low_rank == ('*',) else
                                           f' ({",".join(self.low_rank)})'))
    if self.quantize != 'none' or not parts:
      name = 'fp32' if self.quantize == 'none' else self.quantize
      parts.append(name + (f' g{self.group_size}' if self.group_size else ''))
    left_out = [n for n, on in (('embeddings', self.embeddings),
                                ('byte tables', self.byte_tables)) if not on]
    return ' + '.join(parts) + (f' (not {", ".join(left_out)})' if left_out else '')


def param_class(path: str, shape) -> str:
  """'vector', 'embedding', 'byte_table' or 'matrix' (see the module docstring)."""
  if len(shape) < 2:
    return 'vector'
  keys = path.split(codec.SEP)
  last = keys[-1]
  if last == 'embedding' or last.endswith('_embedding') or last.startswith('ngram_'):
    return 'byte_table' if keys[0].startswith('byte_') else 'embedding'
  return 'matrix'


def selected(path: str, shape, settings: Settings) -> bool:
  """Whether the array at `path` is one the methods may change."""
  cls = param_class(path, shape)
  return (cls == 'matrix' or (cls == 'embedding' and settings.embeddings)
          or (cls == 'byte_table' and settings.byte_tables))


def compress_params(params, settings: Settings) -> tuple[dict, dict, dict]:
  """(stored params tree, {path: spec} of compression.json, summary of what was done)."""
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep=codec.SEP).items()}
  chosen = {p: w for p, w in flat.items() if selected(p, w.shape, settings)}
  summary = dict(selected=sorted(chosen), selected_weights=int(sum(w.size for w in
                                                                   chosen.values())))
  work = dict(chosen)
  keep = {}
  if settings.prune:
    keep = prune_lib.keep_masks(chosen, settings.prune, settings.prune_scope)
    work = {p: np.where(keep[p], w, 0).astype(w.dtype) for p, w in chosen.items()}
    zeroed = int(sum((~m).sum() for m in keep.values()))
    summary['pruned'] = dict(scope=settings.prune_scope, zeroed=zeroed,
                             sparsity=zeroed / max(summary['selected_weights'], 1))
  factors = {}
  if settings.low_rank:
    summary['factored'], summary['not_factored'] = {}, {}
    for p, w in sorted(work.items()):
      if not any(fnmatch.fnmatchcase(p, pat) for pat in settings.low_rank):
        continue
      k, n = codec.matrix_shape(w.shape)
      a, b, r = low_rank_lib.factor(w.reshape(k, n), settings.rank, settings.energy)
      if r * (k + n) >= k * n:
        summary['not_factored'][p] = f'rank {r} of {k}x{n}: the factors would not be smaller'
        continue
      factors[p] = (a, b)
      summary['factored'][p] = r

  def as_stored(x, table: bool):
    if settings.quantize in BITS:
      return codec.encode_int(x, BITS[settings.quantize], settings.group_size,
                              'rows' if table else 'columns')
    if settings.quantize == 'bf16':
      return codec.encode_cast(x, 'bfloat16')
    return codec.encode_array(x)

  stored, specs = {}, {}
  for p, w in flat.items():
    table = param_class(p, w.shape) in ('embedding', 'byte_table')
    if p in factors:
      a, b = factors[p]
      part, spec = codec.encode_low_rank(w, a, b, lambda x: as_stored(x, table),
                                         lambda x: as_stored(x, False))
    elif p in keep and settings.quantize not in BITS and _sparse_is_smaller(keep[p], settings):
      # Float weights of a pruned array: one mask bit each plus the kept values (an int
      # array is stored dense instead, its zeros exact).
      part, spec = codec.encode_sparse(
          work[p], keep[p], lambda v: (codec.encode_cast(v, 'bfloat16')
                                       if settings.quantize == 'bf16' else codec.encode_array(v)))
    elif p in chosen:
      part, spec = as_stored(work[p], table)
    elif settings.quantize == 'bf16' and param_class(p, w.shape) == 'vector':
      part, spec = codec.encode_cast(w, 'bfloat16')
    else:
      part, spec = codec.encode_array(w)
    if spec['kind'] == 'array':
      stored[p] = part
      continue
    specs[p] = spec
    if isinstance(part, dict):
      stored.update({f'{p}{codec.SEP}{k}': v for k, v in
                     traverse_util.flatten_dict(part, sep=codec.SEP).items()})
    else:
      stored[p] = part
  return traverse_util.unflatten_dict(stored, sep=codec.SEP), specs, summary


def _sparse_is_smaller(keep, settings: Settings) -> bool:
  value_bytes = 2 if settings.quantize == 'bf16' else 4
  kept = int(keep.sum())
  return 0 < kept and kept * value_bytes + -(-keep.size // 8) < keep.size * value_bytes


# ----------------------------------------------------------------------- the output

def made_by_tool(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, codec.MANIFEST))


def check_out(out: str, checkpoint: str) -> None:
  """FlagError for an --out that would overwrite or reach into something not ours."""
  out_abs, src_abs = os.path.realpath(out), os.path.realpath(checkpoint)
  if out_abs == src_abs or out_abs.startswith(src_abs + os.sep):
    raise cli_errors.FlagError(f'--out={out} is inside the --checkpoint export; give a '
                               'directory of its own')
  if os.path.isdir(out) and os.listdir(out) and not made_by_tool(out):
    raise cli_errors.FlagError(f'--out={out} exists and holds files stlm.compress did not '
                               f'write (no {codec.MANIFEST}); give a new or empty directory')
  cli_errors.check_output_dir('--out', out)


def compress_export(checkpoint: str, out: str, settings: Settings,
                    archive: str | None = None) -> dict:
  """Writes the compressed export of `checkpoint` to `out` (whole or not at all), and with
  `archive` its .tar.xz; returns its compression.json with the size record under 'size'."""
  settings.check()
  export_lib.check_export(checkpoint, '--checkpoint')
  if made_by_tool(checkpoint):
    raise cli_errors.FlagError(f'--checkpoint={checkpoint} is already a compressed export '
                               f'({codec.MANIFEST}); compress the export it was made from')
  check_out(out, checkpoint)
  if archive:
    cli_errors.check_output_file('--archive', archive)
  out = os.path.abspath(out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.', suffix='.writing',
                             dir=os.path.dirname(out))
  try:
    for name in _COPIED:
      if os.path.isfile(os.path.join(checkpoint, name)):
        shutil.copyfile(os.path.join(checkpoint, name), os.path.join(staging, name))
    if settings.is_identity:
      shutil.copytree(os.path.join(checkpoint, export_lib.PARAMS_DIR),
                      os.path.join(staging, export_lib.PARAMS_DIR))
      shutil.copyfile(os.path.join(checkpoint, export_lib.FILES_MANIFEST),
                      os.path.join(staging, export_lib.FILES_MANIFEST))
      specs, summary = {}, {}
    else:
      exported = export_lib.load_export(checkpoint, '--checkpoint')
      stored, specs, summary = compress_params(exported.params, settings)
      export_lib.write_params(staging, stored)
    manifest = dict(format=codec.FORMAT, tool='stlm.compress', label=settings.label(),
                    source=os.path.abspath(checkpoint),
                    settings=dict(dataclasses.asdict(settings),
                                  low_rank=list(settings.low_rank)),
                    summary=summary, params=specs)
    with open(os.path.join(staging, codec.MANIFEST), 'w', encoding='utf-8') as f:
      json.dump(manifest, f, indent=1)
    record, archive_bytes = artifact.measure(staging)
    artifact.write_record(staging, record)
    if archive:
      with cli_errors.atomic_file(archive, 'wb') as f:
        f.write(archive_bytes)
    _replace(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return dict(manifest, size=record)


def _replace(staging: str, out: str) -> None:
  """Renames `staging` to `out`; an old output of this tool (or an empty directory) there is
  renamed aside first, then removed, so a reader sees the old export or the new one."""
  old = None
  if os.path.isdir(out):
    if os.listdir(out):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.', suffix='.old',
                             dir=os.path.dirname(out))
      os.rmdir(old)
      os.rename(out, old)
    else:
      os.rmdir(out)
  os.rename(staging, out)
  if old:
    shutil.rmtree(old, ignore_errors=True)
