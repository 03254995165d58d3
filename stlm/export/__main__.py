"""python -m stlm.export --checkpoint=<run>/export --format=hf|safetensors --out=<dir>"""

import sys

from absl import app
from absl import flags
from absl import logging

from stlm import export as export_lib
from stlm.export import hf


def main() -> None:
  ckpt = flags.DEFINE_string('checkpoint', None, '<workdir>/export of a training run.')
  fmt = flags.DEFINE_enum('format', 'hf', hf.FORMATS, 'hf: transformers directory (baseline '
                          'family where exact); safetensors: params + stlm config (any kind).')
  out = flags.DEFINE_string('out', None, 'Output directory.')
  flags.mark_flags_as_required(['checkpoint', 'out'])

  def run(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
      config = export_lib.load_config(ckpt.value)
      if fmt.value == 'hf':
        hf.hf_architecture(config)  # refuse before loading anything
      exported = export_lib.load_export(ckpt.value)
      if fmt.value == 'hf':
        arch = hf.export_hf(exported, out.value)
        print(f'wrote a {arch} transformers model to {out.value}')
      else:
        hf.export_safetensors(exported, out.value)
        print(f'wrote {hf.SAFETENSORS_FILE} + config.json to {out.value} '
              '(load with stlm.export.hf.load_safetensors)')
    except (hf.ExportError, FileNotFoundError) as e:
      sys.exit(f'error: {e}')

  app.run(run)


if __name__ == '__main__':
  main()
