"""The one schema every experiment config starts from.

`configs/*.py` build on `base_config()` and `apply_preset`; `validate` is run at
start-up so impossible settings stop the run with a message naming the key.
"""

import ml_collections

SIZE_PRESETS = ('tiny', '10m', '50m', '100m')


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every model kind (the paper's Table 1 baseline at 50m)."""
  c = ml_collections.ConfigDict()
  c.name = 'baseline'
  c.preset = 'tiny'
  c.seed = 0

  m = c.model = ml_collections.ConfigDict()
  m.kind = 'baseline'            # baseline | byte_pool
  m.num_layers = 8
  m.hidden_dim = 512
  m.num_heads = 16
  m.num_kv_heads = 4             # grouped-query attention: 16 / 4 = group size 4
  m.ffn_type = 'swiglu'          # swiglu | gelu
  m.ffn_dim = 1536
  m.position = 'rope'            # rope | sincos | learned | none
  m.rope_theta = 10000.0
  m.max_len = 512                # context length in tokens (chunks for byte_pool)
  m.position_table_len = 0       # learned positions: table size (0 = max_len)
  m.norm = 'rms'                 # rms | layer
  m.norm_eps = 1e-5
  m.dropout = 0.1
  m.tie_embeddings = True
  m.use_bias = False
  m.dtype = 'float32'            # compute dtype: float32 | bfloat16 | float16
  m.param_dtype = 'float32'
  m.attention_impl = 'xla'       # xla | pallas | auto
  # Output layer + loss over this many positions at a time, never the B x T x V logits
  # (stlm/models/chunked_ce.py); 0 = the plain full-logits path.
  m.ce_chunk = 128
  m.remat = 'none'               # none | block | dots_saveable (recompute in the backward)
  m.scan_layers = False          # one nn.scan'd block for all layers (stlm/models/scan_convert.py)
  m.vocab_size = 50257           # overwritten from the tokenizer at start-up
  # Cross-layer weight sharing of the core (stlm/models/weight_sharing.py): none | ffn | ffn_attn,
  # plus per-layer LoRA adapters of this rank on the shared weights (0 = none).
  m.sharing = 'none'
  m.sharing_lora_rank = 0

  # Depth options (stlm/models/depth.py), every one off by default.
  m.layer_drop_max = 0.0         # LayerSkip: layer dropout rising linearly to this at the last layer
  m.layer_drop_per = 'example'   # example | batch: what one skip decision covers
  m.early_exit_layers = ''       # LayerSkip: comma list of layers with an exit loss, e.g. '1,2'
  m.early_exit_weights = ''      # their loss weights: one for all, or one per layer ('' = 1)
  m.early_exit_threshold = 0.0   # inference: exit at the first confident exit (0 = never exit)
  m.mod_capacity = 0.0           # mixture of depths: fraction of tokens a routed block takes (0 = off)
  m.mod_every = 2                # route block_i when i % mod_every == mod_every - 1
  # Pause tokens (stlm/data/pauses.py): inputs that predict nothing, never counted.
  m.pause_every = 0              # after every k tokens (chunks) insert pause_count pauses (0 = off)
  m.pause_count = 1
  m.pause_before_continuation = 0  # scoring: pauses between context and continuation

  # Byte-pool model (config.model.kind == 'byte_pool'); ignored by the baseline.
  b = m.byte_pool = ml_collections.ConfigDict()
  b.max_bytes_per_chunk = 16
  b.byte_dim = 64
  b.encoder_layers = 2
  b.encoder_heads = 4
  b.encoder_ffn_dim = 256
  b.pooling = 'mean'             # mean | attention | last | slots (v2: per-slot concat + projection)
  b.decoder_layers = 2
  b.decoder_heads = 4
  b.decoder_ffn_dim = 256
  b.decoder = 'autoregressive'   # autoregressive | parallel (paper version only)
  b.version = 'paper'            # paper (per-chunk slots) | v2 (ragged byte stream, local models)
  # v2 only (stlm/models/byte_pool/v2.py, stlm/data/byte_stream.py):
  b.stream_len = 0               # symbols per row of the byte stream (0 = 5 x max_len)
  b.local_window = 64            # sliding attention window of the local encoder and decoder
  b.encoder_context = 'window'   # window (earlier chunks' bytes visible) | chunk (own chunk only)
  b.decoder_context = 'window'   # window (previous bytes of earlier chunks) | chunk
  b.ngram_sizes = (3, 4)         # hashed byte n-gram embeddings added in the encoder (BLT)
  b.ngram_buckets = 512          # rows per n-gram table (0 = none); tiny's budget: 90% < 3.2M
  b.ngram_hashes = 1             # hash functions (one table each) per n-gram size (BLT: 3)
  b.slot_embedding = True        # learned slot-in-chunk embedding on local encoder/decoder inputs
  b.condition = 'add'            # core output -> decoder: add (one projection) | slot_add (one per
                                 # slot) | cross_attention (to the last cross_chunks core outputs)
  b.cross_chunks = 4             # core outputs a decoder symbol attends to with cross_attention
  b.condition_at = 'after_attention'  # where it enters the decoder: input | after_attention
                                 # (layer 1) | every_layer (before each block's attention)

  # Masked-LM encoder (config.model.kind == 'encoder', stlm/data/mlm.py); ignored otherwise.
  mlm = m.mlm = ml_collections.ConfigDict()
  mlm.mask_rate = 0.15           # fraction of tokens chosen for prediction
  mlm.mask_prob = 0.8            # chosen -> [MASK]
  mlm.random_prob = 0.1          # chosen -> random token (the rest keep their token)

  t = c.tokenizer = ml_collections.ConfigDict()
  t.kind = 'gpt2'                # gpt2 | sentencepiece | bytes
  t.sp_model_path = ''           # sentencepiece: existing model, or where to save a trained one
  t.sp_vocab_size = 8000

  d = c.data = ml_collections.ConfigDict()
  # builtin | local | tfds name (openwebtext, wikipedia_en, ...) | hf | hf:<preset> | mix
  d.source = 'builtin'
  d.path = ''                    # local: directory of .txt/.jsonl files; instruct: the file
  d.split_by = 'auto'            # auto | file | blank_line | eot | line (how a file becomes documents)
  d.eot_marker = '<|endoftext|>'
  d.jsonl_field = 'text'
  d.instruct_layout = 'auto'     # instruct: auto | alpaca | chat (stlm/data/chat.py)
  d.decode_errors = 'strict'     # strict | replace (bad UTF-8 bytes become U+FFFD, with a warning)
  d.val_fraction = 0.05          # held out by document
  d.max_train_docs = 0           # > 0: train on only the first N train documents (subset studies)
  d.data_dir = ''                # where tfds writes ArrayRecord ('' = ~/.cache/stlm/tfds)
  d.mix = ml_collections.ConfigDict()   # source name -> weight, for source == 'mix'
  # Mix weights w become shares proportional to w ** (1 / mix_temperature): data.mix's and
  # every mixed phase's (1 keeps them; > 1 flattens towards uniform).
  d.mix_temperature = 1.0
  # Phases (a curriculum, stlm/data/phases.py): '<sources>:<end step>,...' in training order,
  # e.g. 'tinystories:150,wiki:300' or 'tinystories*1+wiki*3:300' ('' = data.source throughout).
  d.phases = ''
  # Named sources the phases can read: name -> keys of this data section for that source
  # (source, default 'local'; path, split_by, jsonl_field, ...), e.g. {'wiki': {'path': ...}}.
  d.sources = ml_collections.ConfigDict()
  # source 'hf' (stlm/data/hf_datasets.py): a Hugging Face dataset read through `datasets`.
  d.hf_name = ''                 # Hub id, or json | parquet | csv | text over hf_data_files
  d.hf_config = ''               # the dataset's configuration ('' = its default)
  d.hf_data_files = ''           # local files/globs, comma separated; split=glob for other splits
  d.hf_split = 'train'
  d.hf_val_split = ''            # the dataset's held-out split ('' = val_fraction by hash)
  d.hf_field = 'text'            # text column, or columns joined by a blank line ('title,text')
  d.hf_revision = ''             # Hub branch, tag or commit ('' = the default branch)
  d.hf_streaming = False         # iterate the dataset without writing it to the HF cache first
  d.shuffle_buffer = 1024
  d.num_workers = 0              # grain worker processes; 0 = in-process
  d.num_threads = 2              # grain reader threads that tokenize documents

  tr = c.train = ml_collections.ConfigDict()
  # An export whose params start this run (fresh optimizer); its model and tokenizer sections
  # must equal this config's ('' = random init). Read only when the run starts from step 0.
  tr.init_from = ''
  tr.batch_size = 24             # sequences per micro-batch (global, across all devices)
  tr.grad_accum = 20
  tr.steps = 25000
  tr.lr = 6e-4
  tr.min_lr_ratio = 0.1
  tr.warmup_steps = 5000
  tr.schedule = 'cosine'         # cosine | linear | constant | wsd | inverse_sqrt
  tr.wsd_decay_fraction = 0.2    # wsd: the last fraction of the steps decays
  tr.wsd_decay_shape = 'linear'  # wsd: linear | cosine | 1-sqrt
  tr.weight_decay = 0.1
  # Which params decay: matrices (not norms, biases, embedding/position tables) | ndim2
  # (every param of >= 2 dims, tied embedding included: the original repo's nanoGPT set-up) | all
  tr.weight_decay_params = 'matrices'
  # model.dropout over training (Liu et al. 2023): constant | early (first s steps only) |
  # late (from step s) | linear (down to 0 at step s); s = dropout_schedule_steps (0 = steps)
  tr.dropout_schedule = 'constant'
  tr.dropout_schedule_steps = 0
  # adamw | muon (stlm/train/optimizer.py OPTIMIZERS). muon: Muon for the hidden weight
  # matrices (attention and FFN kernels), this AdamW (lr, b1, b2, eps, weight_decay) for the
  # rest: embeddings, output head, norms, biases, position and byte tables.
  tr.optimizer = 'adamw'
  tr.b1 = 0.9
  tr.b2 = 0.95
  tr.eps = 1e-8
  # Muon's peak lr, on the same schedule as lr. 0.02 with momentum 0.95 is the Muon
  # reference's setting (modded-nanogpt), whose update scaling, sqrt(max(1, fan_out /
  # fan_in)), optax also uses: an orthogonalised update's size does not depend on the
  # gradient's, so this rate is not comparable with AdamW's.
  tr.muon_lr = 0.02
  tr.muon_momentum = 0.95        # Nesterov momentum of the Muon params
  # Decoupled decay of the Muon params chosen by weight_decay_params, multiplied by muon_lr
  # as weight_decay is by lr, so weight_decay's value would decay them far harder; 0 as the
  # Muon reference.
  tr.muon_weight_decay = 0.0
  tr.grad_clip = 1.0
  tr.log_every = 10
  tr.eval_every = 500
  tr.eval_batches = 20           # 0 = the whole validation split
  tr.ckpt_every = 1000
  tr.keep_checkpoints = 3
  tr.restore_fallback = True     # a damaged newest checkpoint: move it aside, resume the previous
  tr.nonfinite_policy = 'stop'   # stop | skip (drop a step whose loss/grad norm is NaN or inf)
  tr.max_consecutive_skips = 10  # skip policy: stop after this many non-finite steps in a row
  tr.final_eval_benchmarks = ''  # comma list run by stlm.eval after training ('' = none)
  tr.final_eval_data_dir = ''    # benchmark release files (final and in-training benchmarks)
  # Benchmarks during training (stlm/train/benchmarks.py): a comma list scored in the run on
  # a fixed sample of eval_benchmarks_limit items each, every eval_benchmarks_every steps
  # (0 = at every validation), at step 0 and at the end ('' = none).
  tr.eval_benchmarks = ''
  tr.eval_benchmarks_every = 0
  tr.eval_benchmarks_limit = 64
  tr.eval_benchmarks_batch = 32  # scorer rows per batch
  # Logit distillation (stlm/train/distill.py): a teacher export with the same tokenizer;
  # objective (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T); top_k > 0 keeps the
  # teacher's k most likely tokens per position ('' teacher = off).
  tr.distill = ml_collections.ConfigDict()
  tr.distill.teacher = ''
  tr.distill.alpha = 0.5
  tr.distill.temperature = 2.0
  tr.distill.top_k = 0
  tr.distill.required = False    # True: a config that only makes sense with a teacher
  # Populations (stlm/train/population.py): N members in one vmapped step, each its own run
  # under <workdir>/members/. population = N takes seeds seed..seed+N-1, population_seeds a
  # comma list; population_overrides 'train.lr=1e-3,3e-3;model.dropout=0,0.1' (one value per
  # member, or one for all); population_data own (each member its seed's data order) | shared.
  tr.population = 0
  tr.population_seeds = ''
  tr.population_overrides = ''
  tr.population_data = 'own'
  tr.population_sharding = 'replicated'  # | members: the member axis split over mesh data
  tr.population_vmap_size = 0    # k: members vmapped k at a time, groups in sequence; 0 = all
  # A workdir lease (stlm/train/lease.py) whose heartbeat is older than this is stale (the
  # holder's host is another machine, so its pid cannot be checked); taken over with a warning.
  tr.lease_stale_s = 300.0
  # Persistent XLA compilation cache: 'auto' (per-user cache dir), '' (off) or a path.
  tr.compile_cache_dir = 'auto'
  # Weights & Biases beside metrics.jsonl and TensorBoard (stlm/train/wandb_writer.py): the
  # project to log to ('' = off; then wandb is not even imported). offline writes the run
  # under <workdir>/wandb/ with no network (`wandb sync` uploads it later) | online.
  tr.wandb_project = ''
  tr.wandb_mode = 'offline'
  tr.wandb_entity = ''           # W&B user or team ('' = the account's default entity)

  # Instruction tuning (docs/sft.md); off while template is ''.
  s = c.sft = ml_collections.ConfigDict()
  s.template = ''                # '' | alpaca | chat (stlm/data/chat.py TEMPLATES)
  s.loss_on = 'response'         # response (prompt targets masked) | all (every target)
  s.markers = ''                 # the template as JSON: filled from template at start-up

  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.shape = (-1, 1, 1)        # (data, fsdp, tensor); -1 takes the remaining devices
  mesh.axes = ('data', 'fsdp', 'tensor')
  return c


# Per-preset overrides of the baseline family: (layers, hidden, heads, kv heads, ffn, context).
_BASELINE_PRESETS = {
    'tiny': dict(num_layers=2, hidden_dim=64, num_heads=4, num_kv_heads=2, ffn_dim=192, max_len=128),
    '10m': dict(num_layers=4, hidden_dim=160, num_heads=8, num_kv_heads=2, ffn_dim=480, max_len=512),
    '50m': dict(num_layers=8, hidden_dim=512, num_heads=16, num_kv_heads=4, ffn_dim=1536, max_len=512),
    '100m': dict(num_layers=10, hidden_dim=768, num_heads=12, num_kv_heads=4, ffn_dim=2048, max_len=512),
}

_TINY_TRAIN = dict(batch_size=8, grad_accum=1, steps=300, lr=3e-3, warmup_steps=30,
                   log_every=10, eval_every=100, eval_batches=8, ckpt_every=100)


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  if preset not in SIZE_PRESETS:
    raise ValueError(f'Unknown size preset {preset!r}; choose one of {", ".join(SIZE_PRESETS)} '
                     '(e.g. --config=configs/baseline.py:50m).')
  c.preset = preset
  c.model.update(_BASELINE_PRESETS[preset])
  if preset == 'tiny':
    c.model.dropout = 0.0
    c.train.update(_TINY_TRAIN)
  return c
