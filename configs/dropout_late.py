"""Issue 9 option 5: late dropout (Liu et al. 2023): none at first, 0.1 from half-way.

Changes: model.dropout = 0.1, train.dropout_schedule = 'late' starting at half the steps.
Why: the counterpart of early dropout, for the OVERFITTING regime (small data, many
epochs): the model first fits freely, then dropout regularises it as it starts to memorise.
For a tiny model on a small corpus this is the schedule to compare against early dropout.
The switch step is train.dropout_schedule_steps (from the preset's steps here).

Presets as configs/baseline.py; --config.model.kind=byte_pool works the same.
"""

from configs import baseline


def get_config(arg: str = 'tiny'):
  c = baseline.get_config(arg)
  c.name = 'dropout_late'
  c.model.dropout = 0.1
  c.train.dropout_schedule = 'late'
  c.train.dropout_schedule_steps = max(c.train.steps // 2, 1)
  return c
