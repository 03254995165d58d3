"""A population: the tiny baseline at four seeds, trained in one vmapped step.

Each member is its own run under <workdir>/members/ (metrics, checkpoints, export), equal to
the single run of its own config (this one with train.population=0 and the member's seed); `train.population_overrides` gives members their own learning
rate, weight decay or dropout. Any config takes the same keys (e.g. configs/byte_pool.py).

  python main.py --config=configs/population.py --workdir=runs/population
  python main.py --config=configs/population.py \
      --config.train.population_overrides='train.lr=1e-3,3e-3,1e-2,3e-2' --workdir=runs/lr_sweep
"""

from configs import baseline


def get_config(preset: str = 'tiny'):
  c = baseline.get_config(preset)
  c.name = 'population'
  c.train.population = 4
  return c
