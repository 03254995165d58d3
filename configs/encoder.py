"""Tiny BERT-style encoders ("Tiny language models", 2025): masked-LM pretraining.

Presets:
  bert6  6 layers, 12 heads, hidden 192, context 128 (the study's BERT-6 shape, CPU width)
  bert1  1 layer, 12 heads, hidden 192, context 128 (the study's BERT-1)
  bert1_24h  bert1 with 24 heads (head dim 8)
  bert6_mini, bert1_mini  the same at hidden 96 (12 heads of 8) with 2,048 tokenizer pieces:
         the CPU-scale models of stlm.experiments.tiny_encoders
  bert1_wiki  bert1 pretrained on the shared English Wikipedia shards (all train pages,
         $STLM_DATA_DIR or ../shared/data beside the repository), 800 steps of 32 x 128:
         the pretrained-vs-scratch comparison of scripts/encoder_vs_scratch.sh
  tiny (CPU demo, the default), 10m, 50m, 100m: the baseline's sizes, bidirectional.
  --config=configs/encoder.py:bert1

Pretrains on the built-in corpus like every config; the study's runs use the shared English
Wikipedia shards: --config.data.source=local --config.data.path=<data>/corpus/wikipedia_en
and a pretraining subset with --config.data.max_train_docs=N (N pages; 0 = all).

Tokenizer: a sentencepiece BPE model (4,096 pieces) trained on the pretraining subset, so the
dense masked-LM head stays cheap on CPU; its [MASK] is one id past the vocabulary (an extra
embedding row), see stlm/data/mlm.py. Any tokenizer.kind works (gpt2: 50,257 + 1 rows).
Metrics: masked-token loss and accuracy (bits per byte has no meaning for a masked LM).
"""

import os

from stlm import config as config_lib

# (layers, hidden, heads, kv heads, ffn, context) of the study's shapes at CPU width.
_BERT = {
    'bert6': dict(num_layers=6, hidden_dim=192, num_heads=12, num_kv_heads=12, ffn_dim=768,
                  max_len=128),
    'bert1': dict(num_layers=1, hidden_dim=192, num_heads=12, num_kv_heads=12, ffn_dim=768,
                  max_len=128),
    'bert1_24h': dict(num_layers=1, hidden_dim=192, num_heads=24, num_kv_heads=24,
                      ffn_dim=768, max_len=128),
    # The same shapes at half width (head dim 8) with a 2,048-piece tokenizer: CPU-scale
    # models for the experiment grid.
    'bert6_mini': dict(num_layers=6, hidden_dim=96, num_heads=12, num_kv_heads=12,
                       ffn_dim=384, max_len=128),
    'bert1_mini': dict(num_layers=1, hidden_dim=96, num_heads=12, num_kv_heads=12,
                       ffn_dim=384, max_len=128),
}
# Presets that pretrain a _BERT shape on the shared Wikipedia shards: (shape, train overrides).
_WIKI = {
    'bert1_wiki': ('bert1', dict(steps=800, warmup_steps=80, lr=2e-3, eval_every=400,
                                 ckpt_every=400)),
}
PRESETS = tuple(_BERT) + tuple(_WIKI) + config_lib.SIZE_PRESETS


def shared_wikipedia_path() -> str:
  """The shared English Wikipedia shards: $STLM_DATA_DIR/corpus/wikipedia_en, else
  ../shared/data/corpus/wikipedia_en (relative to the working directory: the repo root)."""
  root = os.environ.get('STLM_DATA_DIR') or os.path.join('..', 'shared', 'data')
  return os.path.join(root, 'corpus', 'wikipedia_en')

_BERT_TRAIN = dict(batch_size=32, grad_accum=1, steps=600, lr=1e-3, warmup_steps=60,
                   schedule='cosine', log_every=20, eval_every=200, eval_batches=8,
                   ckpt_every=200, weight_decay=0.01)


def get_config(arg: str = 'tiny'):
  preset = arg or 'tiny'
  if preset not in PRESETS:
    raise ValueError(f'Unknown encoder preset {preset!r}; choose one of {", ".join(PRESETS)} '
                     '(e.g. --config=configs/encoder.py:bert1).')
  shape, wiki_train = _WIKI.get(preset, (preset, None))
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny' if shape in _BERT else shape)
  c.name = 'encoder'
  c.preset = preset
  c.model.kind = 'encoder'
  # BERT: GELU FFN, learned absolute positions, LayerNorm, multi-head (no grouping).
  c.model.ffn_type = 'gelu'
  c.model.position = 'learned'
  c.model.norm = 'layer'
  c.model.num_kv_heads = c.model.num_heads
  c.model.tie_embeddings = True
  c.tokenizer.kind = 'sentencepiece'
  c.tokenizer.sp_vocab_size = 4096
  if shape in _BERT:
    c.model.update(_BERT[shape])
    if shape.endswith('_mini'):
      c.tokenizer.sp_vocab_size = 2048
    c.model.dropout = 0.0
    c.train.update(_BERT_TRAIN)
  if wiki_train is not None:
    c.data.source = 'local'
    c.data.path = shared_wikipedia_path()
    c.train.update(wiki_train)
  return c
