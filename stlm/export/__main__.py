"""python -m stlm.export --checkpoint=<run>/export --format=hf|safetensors --out=<dir>"""

import os

from absl import app
from absl import flags
from absl import logging

from stlm import cli_errors
from stlm import export as export_lib
from stlm.export import hf


def main() -> None:
  ckpt = flags.DEFINE_string('checkpoint', None, '<workdir>/export of a training run.')
  fmt = flags.DEFINE_enum('format', 'hf', hf.FORMATS, 'hf: transformers directory (baseline '
                          'family where exact); safetensors: params + stlm config (any kind).')
  out = flags.DEFINE_string('out', None, 'Output directory.')
  flags.mark_flags_as_required(['checkpoint', 'out'])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.set_verbosity(logging.WARNING)
    # Refuse before loading anything: a config HF cannot hold, an unwritable --out (load_export
    # then checks the params files before reading them).
    config = export_lib.load_config(ckpt.value, '--checkpoint')
    if fmt.value == 'hf':
      try:
        hf.hf_architecture(config)
      except hf.ExportError as e:
        raise hf.ExportError(f'--format=hf of --checkpoint={ckpt.value}: {e}') from None
    if os.path.abspath(out.value) == os.path.abspath(ckpt.value):
      raise cli_errors.FlagError(f'--out={out.value} is the --checkpoint directory; writing '
                                 'there would replace the export\'s own config.json')
    cli_errors.check_output_dir('--out', out.value)
    exported = export_lib.load_export(ckpt.value, '--checkpoint')
    # Written whole beside --out, then renamed in: a failure leaves no partial model there.
    with cli_errors.staged_dir(out.value) as staging:
      if fmt.value == 'hf':
        arch = hf.export_hf(exported, staging)
      else:
        hf.export_safetensors(exported, staging)
    if fmt.value == 'hf':
      print(f'wrote a {arch} transformers model to {out.value}')
    else:
      print(f'wrote {hf.SAFETENSORS_FILE} + config.json to {out.value} '
            '(load with stlm.export.hf.load_safetensors)')

  cli_errors.run(run)

if __name__ == '__main__':
  main()
