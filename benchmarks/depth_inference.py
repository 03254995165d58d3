"""Scores a run's validation documents at several early-exit thresholds: bits/byte and depth.

  python benchmarks/depth_inference.py --export=<workdir>/export [--thresholds=0,0.5,0.8] \
      [--docs=200] [--batch_size=16]

Reads the export's own validation split (the documents its training held out, from the
same tfds data_dir), scores every target once with the jitted scorer (inference mode:
early exits at the threshold, mixture-of-depths routing by its causal predictor, pauses as
configured), and prints bits per byte, the model's statistics per position (layers_used,
mod_frac_block<i>) and scored targets/s. Threshold 0 never exits: the full model.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from stlm import export as export_lib
from stlm.data import pipeline
from stlm.data import tfds_builders
from stlm.eval import perplexity
from stlm.eval import scorer as scorer_lib
from stlm.models import factory

_EXPORT = flags.DEFINE_string('export', None, '<workdir>/export of a training run.')
_THRESHOLDS = flags.DEFINE_list('thresholds', ['0'], 'Early-exit confidence thresholds.')
_DOCS = flags.DEFINE_integer('docs', 200, 'Validation documents scored (the first N).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Scorer batch size.')


def main(argv):
  del argv
  exported = export_lib.load_export(_EXPORT.value)
  config = exported.config
  docs = pipeline.document_dataset(config, 'validation')
  texts = [tfds_builders.record_text(docs[i]) for i in range(min(_DOCS.value, len(docs)))]
  for threshold in map(float, _THRESHOLDS.value):
    model_cfg = config.model.copy_and_resolve_references()
    model_cfg.early_exit_threshold = threshold
    scorer = scorer_lib.Scorer(factory.build_model(model_cfg), exported.params,
                               exported.featurizer, batch_size=_BATCH.value)
    ppl = perplexity.perplexity(scorer, texts)
    stats = scorer.stats.get('model_stats', {})
    shown = ', '.join(f'{k} {v:.3f}' for k, v in sorted(stats.items())
                      if not k.startswith('exit'))
    print(f'{config.name} {config.model.kind} threshold {threshold:g}: '
          f'{ppl["bits_per_byte"]:.4f} bits/byte over {ppl["bytes"]:,} bytes of {len(texts)} '
          f'docs; {shown or "no model stats"}; '
          f'{ppl["tokens"] / scorer.stats["seconds"]:,.0f} targets/s', flush=True)


if __name__ == '__main__':
  flags.mark_flag_as_required('export')
  app.run(main)
