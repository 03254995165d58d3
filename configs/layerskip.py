"""LayerSkip (Elhoushi et al. 2024): layer dropout rising with depth + early-exit losses.

Why: a small model should not need every layer for every token. Dropping deeper layers more
often (rate 0 at the first layer rising linearly to 0.2 at the last, training only) makes
the later layers refine rather than carry the representation, and an early-exit loss at
every intermediate layer, through the model's OWN head (the tied embedding for the baseline,
the byte decoder for byte_pool: no new parameters), teaches the shared head to read the
earlier layers. At inference a token can then stop at the first layer whose head is
confident enough: set `--config.model.early_exit_threshold=0.8` (0, the default here, never
exits, so validation bits/byte is the full model's). Metrics report `exit<l>_nll` (nats per
target at layer l), `extra_loss` (the weighted exit losses in the objective) and
`layers_used` (average layers per target).

Presets: tiny (the default), 10m, 50m, 100m: --config=configs/layerskip.py:50m
Byte-pool model: add --config.model.kind=byte_pool.
"""

from stlm import config as config_lib

LAYER_DROP_MAX = 0.2   # LayerSkip's pretraining runs use p_max 0.1-0.2
EXIT_WEIGHT = 0.1      # per exit layer; the final layer's own loss keeps weight 1


def get_config(arg: str = 'tiny'):
  c = config_lib.apply_preset(config_lib.base_config(), arg or 'tiny')
  c.name = 'layerskip'
  c.model.layer_drop_max = LAYER_DROP_MAX
  c.model.early_exit_layers = ','.join(str(l) for l in range(1, c.model.num_layers))
  c.model.early_exit_weights = str(EXIT_WEIGHT)
  return c
