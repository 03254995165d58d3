"""python -m stlm.compress --checkpoint=<run>/export --out=<dir> [--quantize=int8 ...]

Writes a compressed export that stlm.eval, stlm.generate and the scorer load as they load any
export (dequantised on load), and prints its size on disk and as a .tar.xz.

  python -m stlm.compress --checkpoint=runs/baseline_tiny/export --out=runs/b_int4/export \\
      --quantize=int4 --group_size=64
  python -m stlm.compress --checkpoint=runs/baseline_tiny/export --out=runs/b_p50/export \\
      --prune=0.5 --prune_scope=layer
  python -m stlm.compress --checkpoint=runs/baseline_tiny/export --out=runs/b_lr/export \\
      --low_rank='*' --rank=32 --archive=runs/b_lr.tar.xz
"""

from absl import app
from absl import flags
from absl import logging

from stlm import cli_errors
from stlm import compress

_CKPT = flags.DEFINE_string('checkpoint', None, '<workdir>/export of a training run.')
_OUT = flags.DEFINE_string('out', None, 'Output export directory (new, empty, or an earlier '
                           'output of this tool, which is replaced).')
_QUANTIZE = flags.DEFINE_string('quantize', 'none', f'{"|".join(compress.QUANTIZE)}: how '
                                'the selected arrays are stored (none: float32 as trained).')
_GROUP = flags.DEFINE_integer('group_size', 0, 'int8/int4: rows per scale in each column (a '
                              'table: entries per scale in each row); 0: one scale per channel.')
_EMB = flags.DEFINE_bool('embeddings', True, 'Compress the token embedding tables (and a '
                         'tied head) too.')
_BYTE = flags.DEFINE_bool('byte_tables', True, 'Compress the byte-pool byte embeddings and '
                          'n-gram tables too.')
_PRUNE = flags.DEFINE_float('prune', 0.0, 'Magnitude pruning: fraction of the selected weights '
                            'set to zero, in [0, 1).')
_SCOPE = flags.DEFINE_string('prune_scope', 'layer', 'layer: each array pruned to --prune; '
                             'global: one threshold over all selected arrays.')
_LOW_RANK = flags.DEFINE_list('low_rank', [], 'Patterns (fnmatch) of param paths a/b/c to '
                              'factor into two low-rank matrices; "*": every selected matrix.')
_RANK = flags.DEFINE_integer('rank', None, 'Rank of the --low_rank factors.')
_ENERGY = flags.DEFINE_float('energy', None, 'Or: the smallest rank keeping this share of the '
                             'squared singular values, in (0, 1].')
_ARCHIVE = flags.DEFINE_string('archive', None, 'Also write the export as this .tar.xz file '
                               '(the second size figure is its size).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for flag in (_CKPT, _OUT):
    if not flag.value:
      raise cli_errors.FlagError(f'--{flag.name} is required')
  logging.set_verbosity(logging.WARNING)
  settings = compress.Settings(
      quantize=_QUANTIZE.value, group_size=_GROUP.value, embeddings=_EMB.value,
      byte_tables=_BYTE.value, prune=_PRUNE.value, prune_scope=_SCOPE.value,
      low_rank=tuple(_LOW_RANK.value), rank=_RANK.value, energy=_ENERGY.value)
  result = compress.compress_export(_CKPT.value, _OUT.value, settings, _ARCHIVE.value)
  size = result['size']
  print(f'wrote {_OUT.value} ({result["label"]}): {size["bytes"]:,} bytes on disk '
        f'({size["bytes"] / 1e6:.3f} MB), {size["xz_bytes"]:,} bytes as .tar.xz '
        f'({size["xz_bytes"] / 1e6:.3f} MB)' + (f', written to {_ARCHIVE.value}'
                                               if _ARCHIVE.value else ''))


if __name__ == '__main__':
  cli_errors.run(main)
