"""Instruction tuning (docs/sft.md): a pretrained export fine-tuned on instruction data.

  python main.py --config=configs/sft.py --config.train.init_from=<workdir>/export \
      --config.data.path=<alpaca.json> --workdir=runs/sft

The model section is the baseline's of the preset (`:tiny`, `:50m`, ...), or the byte-pool
config's with `:byte_pool` / `:byte_pool_<preset>`; it must equal the export's model and
tokenizer sections (a differing key is refused, naming it), so any model override given to
pretraining is given here too.
Loss only on response tokens (chunks for byte-pool) by default; --config.sft.loss_on=all
trains on every token. Held out by item: data.val_fraction of the items.
"""

from configs import baseline
from configs import byte_pool


def get_config(arg: str = 'tiny'):
  arg = arg or 'tiny'
  if arg.startswith('byte_pool'):
    c = byte_pool.get_config(arg[len('byte_pool'):].lstrip('_') or 'tiny')
  else:
    c = baseline.get_config(arg)
  c.name = 'sft'
  c.data.source = 'instruct'
  c.data.instruct_layout = 'auto'
  c.sft.template = 'alpaca'
  c.sft.loss_on = 'response'
  # Fine-tuning: a short schedule from a lower peak than pretraining's, short warmup.
  c.train.lr = c.train.lr / 3
  c.train.warmup_steps = min(c.train.warmup_steps, max(c.train.steps // 10, 1))
  c.data.shuffle_buffer = 256
  c.train.eval_batches = 0   # the whole held-out split: what stlm.eval --instruct scores
  return c
