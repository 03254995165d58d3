"""Issue 9 option 5: early dropout (Liu et al. 2023, "Dropout Reduces Underfitting").

Changes: model.dropout = 0.1 (also at the tiny preset, which otherwise has none), applied only
for the first 20% of the steps (train.dropout_schedule = 'early'), then 0.
Why: Liu et al. find that dropout early in training lowers the variance of mini-batch
gradients and aligns them with the full-data gradient, which helps models that UNDERFIT;
super tiny models trained on plenty of data are in that regime. Dropping it later lets the
model use its full capacity to fit.
The switch step is train.dropout_schedule_steps (set from the preset's steps here; pass it
again if you override --config.train.steps).

Presets as configs/baseline.py; --config.model.kind=byte_pool works the same.
"""

from configs import baseline


def get_config(arg: str = 'tiny'):
  c = baseline.get_config(arg)
  c.name = 'dropout_early'
  c.model.dropout = 0.1
  c.train.dropout_schedule = 'early'
  c.train.dropout_schedule_steps = max(c.train.steps // 5, 1)
  return c
