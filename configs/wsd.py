"""Issue 9 option 6: warmup-stable-decay learning rate (MiniCPM, Hu et al. 2024).

Changes: train.schedule = 'wsd': linear warmup, the peak rate held constant, then the last
20% of the steps decay to lr * min_lr_ratio along 1 - sqrt (Haegele et al. 2024).
Why: a cosine schedule ties the whole run to its length; WSD trains at the peak rate for
most of the run and needs only a short decay to reach (or beat) cosine's loss, so one long
stable run can be branched into decays at any step: cheap scaling-law and data ablations,
exactly what a super tiny model programme runs most. train.wsd_decay_fraction and
train.wsd_decay_shape (linear | cosine | 1-sqrt) are the knobs.

Presets as configs/baseline.py; --config.model.kind=byte_pool works the same.
"""

from configs import baseline


def get_config(arg: str = 'tiny'):
  c = baseline.get_config(arg)
  c.name = 'wsd'
  c.train.schedule = 'wsd'
  c.train.wsd_decay_fraction = 0.2
  c.train.wsd_decay_shape = '1-sqrt'
  return c
