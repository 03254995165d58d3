"""What the experiment commands share: finished runs, a held-out document set, its score."""

import json
import os

from stlm import cli_errors
from stlm import export as export_lib
from stlm.data import pipeline
from stlm.data import tfds_builders
from stlm.eval import perplexity
from stlm.eval import zero_shot


def finished(run_dir: str) -> bool:
  """Whether run_dir holds a finished run with its export (an experiment does not redo it)."""
  try:
    with open(os.path.join(run_dir, 'run.json')) as f:
      return json.load(f).get('status') == 'finished' and export_lib.is_export(
          os.path.join(run_dir, 'export'))
  except (OSError, ValueError):
    return False


def write_documents(config, count: int, path: str) -> list[str]:
  """The first `count` documents of config's validation split, also written to `path` as
  jsonl so that `python -m stlm.eval --benchmarks= --text=<path>` scores the same text."""
  docs = pipeline.document_dataset(config, 'validation')
  texts = [tfds_builders.record_text(docs[i]) for i in range(min(count, len(docs)))]
  with cli_errors.atomic_file(path) as f:
    f.writelines(json.dumps({'text': t}) + '\n' for t in texts)
  return texts


def score(export_dir: str, texts: list[str], text_path: str,
          results_path: str | None = None) -> dict:
  """Bits per byte of an export on `texts`, written to results.json (beside the export unless
  results_path says where) as stlm.eval --text writes it; an existing one is read back."""
  results_path = results_path or os.path.join(os.path.dirname(export_dir), 'results.json')
  if os.path.exists(results_path):
    with open(results_path) as f:
      return json.load(f)
  exported = export_lib.load_export(export_dir)
  ppl = perplexity.perplexity(zero_shot.make_scorer(exported, 32), texts)
  ppl['files'] = [text_path]
  return zero_shot.write_results(results_path, exported, export_dir, {}, ppl)
