"""Data phases: TinyStories first, then English Wikipedia (a simple-to-hard curriculum).

Changes: data.phases = 'stories:<half the steps>,wiki': the first half of training reads the
TinyStories head (short, simple English), the second half Wikipedia articles, each from the
shared corpus (data.sources.stories, data.sources.wiki; override their paths for another
location). Evaluation reads the held-out documents of both.
Why: a tiny model may learn the basics of English faster on simple text; the curriculum
against the shuffled mix of the same text and against Wikipedia alone is
`python -m stlm.experiments.curriculum`.

  python main.py --config=configs/curriculum.py --workdir=runs/curriculum_tiny
  python main.py --config=configs/curriculum.py \\
      --config.data.sources.stories.path=$D/corpus/tinystories/train_head_cased.txt \\
      --config.data.sources.wiki.path=$D/corpus/wikipedia_en

Presets as configs/baseline.py; --config.model.kind=byte_pool works the same.
"""

import ml_collections

from configs import baseline

DATA_ROOT = '../shared/data'
# Under the shared data root: what the phases read (stlm.experiments.curriculum reads them too).
STORIES_FILE = 'corpus/tinystories/train_head_cased.txt'
WIKI_DIR = 'corpus/wikipedia_en'


def get_config(arg: str = 'tiny'):
  c = baseline.get_config(arg)
  c.name = 'curriculum'
  c.data.sources = ml_collections.ConfigDict({
      'stories': {'path': f'{DATA_ROOT}/{STORIES_FILE}'},
      'wiki': {'path': f'{DATA_ROOT}/{WIKI_DIR}'},
  })
  c.data.phases = f'stories:{c.train.steps // 2},wiki'
  return c
