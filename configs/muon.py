"""Muon (Jordan et al. 2024, modded-nanogpt) for the hidden weight matrices, AdamW for the rest.

Changes: train.optimizer = 'muon'. The attention (q, k, v, o) and FFN kernels, and the other
hidden projections, take Muon's update: Nesterov momentum orthogonalised by five quintic
Newton-Schulz steps (optax.contrib.muon), at peak rate train.muon_lr = 0.02 on the same
schedule as train.lr, momentum 0.95, no weight decay. Embeddings, the output head, norms,
biases, position tables and the byte-pool byte and n-gram tables keep the baseline's AdamW
(train.lr, b1, b2, eps, weight_decay and weight_decay_params).
Why: Muon's orthogonalised update moves a weight matrix by the same amount along every
direction of its gradient instead of mostly along the few dominant ones; in the
modded-nanogpt speedruns (GPT-2 small) it reaches AdamW's loss in fewer steps, and it costs
only a few small matmuls per matrix per step, so it is a candidate for the short runs a
super tiny model programme does most.

Presets as configs/baseline.py; --config.model.kind=byte_pool works the same:
  python main.py --config=configs/muon.py:10m
  python main.py --config=configs/muon.py:10m --config.model.kind=byte_pool
"""

from configs import baseline


def get_config(arg: str = 'tiny'):
  c = baseline.get_config(arg)
  c.name = 'muon'
  c.train.optimizer = 'muon'
  c.train.muon_lr = 0.02
  c.train.muon_momentum = 0.95
  c.train.muon_weight_decay = 0.0
  return c
