"""Instruction tuning: templates, the response mask, packing isolation, init_from, chat."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from configs import sft as sft_config
from stlm import export as export_lib
from stlm import generate
from stlm import tokenizers
from stlm.data import byte_stream
from stlm.data import chat
from stlm.data import chunking
from stlm.data import featurize
from stlm.data import pipeline
from stlm.data import sft
from stlm.models import baseline
from stlm.models import kinds
from stlm.train import checkpoint
from stlm.train import loop
from stlm.train import step as step_lib
from tests import test_byte_pool as tbp

ITEMS = [
    {'instruction': 'Name a colour.', 'input': '', 'output': 'Blue, like the sea.'},
    {'instruction': 'Add the numbers.', 'input': '2 and 3', 'output': 'They make 5.'},
    {'instruction': 'Say hello in French.', 'input': '', 'output': 'Bonjour ! Ça va ?'},
    {'instruction': 'Reverse the word.', 'input': 'stressed', 'output': 'desserts'},
]
CHAT = {'messages': [{'role': 'system', 'content': 'Be brief.'},
                     {'role': 'user', 'content': 'Hi there'},
                     {'role': 'assistant', 'content': 'Hello.'},
                     {'role': 'user', 'content': 'Two plus two?'},
                     {'role': 'assistant', 'content': 'Four.\n\nSure.'}]}


@pytest.fixture(scope='module')
def gpt2():
  return tokenizers.GPT2Tokenizer()


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize('name', sorted(chat.TEMPLATES))
@pytest.mark.parametrize('item', ITEMS + [CHAT], ids=lambda i: str(i)[:20])
def test_template_round_trips(name, item):
  template = chat.get_template(name)
  turns = chat.turns_of(item)
  text = template.text(turns)
  assert template.parse(text) == turns
  pieces = template.render(turns)
  assert ''.join(t for t, _ in pieces) == text
  # Response pieces are exactly each assistant content followed by the end marker.
  responses = [t for t, is_response in pieces if is_response]
  assert responses == [t['content'] + template.end for t in turns
                       if t['role'] == chat.RESPONSE_ROLE]
  # The generation prompt is the text before the last response.
  last = max(i for i, t in enumerate(turns) if t['role'] == chat.RESPONSE_ROLE)
  assert text.startswith(template.prompt(turns[:last]))
  assert text[len(template.prompt(turns[:last])):] == turns[last]['content'] + template.end


def test_template_records_and_restores_from_json():
  template = chat.get_template('alpaca')
  assert chat.Template.from_json(template.to_json()) == template
  config = ml_collections.ConfigDict({'sft': {'template': 'alpaca',
                                              'markers': template.to_json()}})
  assert chat.template_of(config) == template


def test_alpaca_layout_keeps_input_as_its_own_turn():
  assert [t['role'] for t in chat.turns_of(ITEMS[1])] == ['user', 'input', 'assistant']
  assert [t['role'] for t in chat.turns_of(ITEMS[0])] == ['user', 'assistant']
  with pytest.raises(chat.ChatDataError, match='assistant'):
    chat.turns_of({'messages': [{'role': 'user', 'content': 'x'}]})


# ---------------------------------------------------------------- the response mask


def _token_featurizer(gpt2, max_len=512, loss_on='response'):
  return sft.SftFeaturizer(featurize.TokenFeaturizer(gpt2, max_len),
                           chat.get_template('alpaca'), loss_on)


def test_token_mask_is_one_exactly_on_response_tokens(gpt2):
  f = _token_featurizer(gpt2)
  turns = chat.turns_of(ITEMS[1])
  (example,) = f.document(chat.encode_record(turns))
  pieces = chat.get_template('alpaca').render(turns)
  prompt_ids = gpt2.encode(pieces[0][0])
  response_ids = gpt2.encode(pieces[1][0])
  mask = example['loss_mask']
  # targets: prompt (after eot) ... then response, then the closing end-of-text.
  assert mask.tolist() == [0.0] * len(prompt_ids) + [1.0] * (len(response_ids) + 1)
  np.testing.assert_array_equal(example['targets'][mask == 1][:-1], response_ids)
  assert gpt2.decode(example['targets'][mask == 1][:-1].tolist()) == 'They make 5.\n### End'
  (every,) = _token_featurizer(gpt2, loss_on='all').document(chat.encode_record(turns))
  assert every['loss_mask'].all()


@pytest.mark.parametrize('layout', ['paper', 'v2'])
def test_byte_pool_mask_is_per_chunk_of_the_response(gpt2, layout):
  if layout == 'paper':
    base = chunking.ChunkFeaturizer(gpt2, 512, 16)
  else:
    base = byte_stream.StreamFeaturizer(gpt2, 512, 16)
  f = sft.SftFeaturizer(base, chat.get_template('alpaca'))
  turns = chat.turns_of(ITEMS[2])
  (example,) = f.document(chat.encode_record(turns))
  pieces = chat.get_template('alpaca').render(turns)
  mask = example['loss_mask']
  n_prompt, n_response = len(base.chunks(pieces[0][0])), len(base.chunks(pieces[1][0]))
  assert mask.tolist() == [0.0] * n_prompt + [1.0] * (n_response + 1)
  # The masked targets' bytes are exactly the response's (its likelihood stays per chunk).
  assert example['target_bytes'][mask == 1].sum() == len(pieces[1][0].encode('utf-8'))


def test_prompt_targets_contribute_nothing_to_loss_or_gradient(gpt2):
  cfg = tbp.small_cfg()
  cfg.kind, cfg.vocab_size, cfg.max_len = 'baseline', gpt2.vocab_size, 64
  model = baseline.BaselineLM(cfg)
  f = _token_featurizer(gpt2, 64)
  (example,) = f.document(chat.encode_record(chat.turns_of(ITEMS[1])))
  T = len(example['targets'])
  batch = {k: v[None] for k, v in example.items()}
  batch.update(segment_ids=np.ones((1, T), np.int32), positions=np.arange(T)[None])
  params = tbp.fast_init(model, batch)

  @jax.jit
  def loss_and_grad(params, targets):
    b = dict(batch, targets=targets)
    return jax.value_and_grad(lambda p: step_lib.loss_sums(model, p, b)['nll'])(params)

  loss, grad = loss_and_grad(params, batch['targets'])
  mask = example['loss_mask']
  prompt_pos, response_pos = np.flatnonzero(mask == 0), np.flatnonzero(mask == 1)
  changed = batch['targets'].copy()
  changed[0, prompt_pos] = (changed[0, prompt_pos] + 7) % gpt2.vocab_size
  loss2, grad2 = loss_and_grad(params, changed)
  assert float(loss2) == float(loss)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad2)):
    np.testing.assert_array_equal(a, b)
  for t in response_pos:   # every response target moves the loss
    one = batch['targets'].copy()
    one[0, t] = (one[0, t] + 7) % gpt2.vocab_size
    assert float(loss_and_grad(params, one)[0]) != float(loss)


# ---------------------------------------------------------------- packing


def _instruct_config(path, tmp_path, kind_config=None, **train):
  c = kind_config or sft_config.get_config('tiny')
  c.data.path, c.data.data_dir = str(path), str(tmp_path / 'tfds')
  c.data.val_fraction = 0.25
  c.sft.markers = chat.get_template(c.sft.template).to_json()
  c.train.update(train)
  return c


def _write_items(tmp_path, items):
  path = tmp_path / 'items.json'
  path.write_text(json.dumps(items))
  return path


def test_packed_conversations_never_attend_to_each_other(gpt2, tmp_path):
  items = ITEMS * 3
  items = [dict(it, output=f'{it["output"]} ({i})') for i, it in enumerate(items)]
  c = _instruct_config(_write_items(tmp_path, items), tmp_path, batch_size=2)
  c.model.max_len = 96
  f = sft.maybe_wrap(c, featurize.TokenFeaturizer(gpt2, 96))
  batch = next(iter(pipeline.make_eval_iter(c, f, 'train')))
  row = int(np.argmax(batch['segment_ids'].max(axis=1)))
  segs = batch['segment_ids'][row]
  assert segs.max() >= 2   # several conversations share this row
  cfg = tbp.small_cfg()
  cfg.kind, cfg.vocab_size, cfg.max_len = 'baseline', gpt2.vocab_size, 96
  model = baseline.BaselineLM(cfg)
  params = tbp.fast_init(model, batch)
  forward = jax.jit(lambda p, b: model.apply({'params': p}, b)['logprobs'])
  base = np.asarray(forward(params, batch))[row]
  for s in range(1, int(segs.max()) + 1):
    changed = {k: v.copy() for k, v in batch.items()}
    changed['inputs'][row, segs == s] = (changed['inputs'][row, segs == s] + 11) % 50000
    out = np.asarray(forward(params, changed))[row]
    others = (segs != s) & (segs > 0)
    np.testing.assert_array_equal(out[others], base[others])
    assert not np.array_equal(out[segs == s], base[segs == s])


def test_held_out_split_is_by_item(tmp_path):
  items = [dict(instruction=f'Item {i}.', input='', output=f'Answer {i}.') for i in range(40)]
  c = _instruct_config(_write_items(tmp_path, items), tmp_path)
  train = pipeline.document_dataset(c, 'train')
  val = pipeline.document_dataset(c, 'validation')
  assert len(train) + len(val) == 40 and len(val) >= 1
  from stlm.data import tfds_builders
  texts = lambda ds: {tfds_builders.record_text(ds[i]) for i in range(len(ds))}
  assert not texts(train) & texts(val)
  assert all(json.loads(t)[-1]['role'] == 'assistant' for t in texts(val))


# ---------------------------------------------------------------- init_from


@pytest.fixture(scope='module')
def tiny_export(tmp_path_factory):
  """A randomly initialised export of the tiny baseline (what init_from reads)."""
  c = sft_config.get_config('tiny')
  c.model.vocab_size = tokenizers.GPT2Tokenizer().vocab_size
  model = baseline.BaselineLM(c.model)
  batch = kinds.layout_batch(c.model, (), 1, 8)
  params = tbp.fast_init(model, batch)
  path = str(tmp_path_factory.mktemp('export') / 'export')
  export_lib.save_export(path, params, c)
  return path


def test_init_from_another_model_is_refused_naming_the_keys(tiny_export):
  c = sft_config.get_config('tiny')
  c.model.vocab_size = tokenizers.GPT2Tokenizer().vocab_size
  c.train.init_from = tiny_export
  c.model.num_layers, c.model.ffn_dim = 3, 100
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    loop._check_init_from(c)
  assert 'model.num_layers: checkpoint has 2, this run has 3' in str(e.value)
  assert 'model.ffn_dim' in str(e.value)


def test_init_from_may_differ_in_data_schedule_and_steps(tiny_export):
  c = sft_config.get_config('tiny')
  c.model.vocab_size = tokenizers.GPT2Tokenizer().vocab_size
  c.train.init_from = tiny_export
  c.train.steps, c.train.lr, c.seed = 7, 1e-4, 3
  c.data.path, c.sft.loss_on = '/elsewhere.json', 'all'
  assert loop._check_init_from(c) == tiny_export


# ---------------------------------------------------------------- chat generation


class _Scripted:
  """A generation strategy that writes fixed units, counting how many it was asked for."""

  def __init__(self, units):
    self.units, self.picked, self.prompts = units, 0, []

  def __call__(self, model, params, model_cfg, tokenizer, data, rng, max_bytes, sampling,
               stats, emit=None):
    self.prompts.append(bytes(data).decode('utf-8'))
    out = bytearray()
    for unit in self.units:
      self.picked += 1
      out += unit
      if len(out) >= max_bytes or (emit is not None and emit(unit)):
        break
    return out


@pytest.fixture
def scripted_kind(monkeypatch):
  def install(units):
    strategy = _Scripted(units)
    kind = kinds.get_kind('baseline')
    import dataclasses
    monkeypatch.setitem(kinds._REGISTRY, 'baseline',
                        dataclasses.replace(kind, generation=strategy))
    return strategy
  return install


def test_chat_stops_at_the_end_marker_and_streams_only_the_reply(scripted_kind):
  template = chat.get_template('alpaca')
  units = [b'Blue', b',', b' like', b' the', b' sea', b'.\n', b'###', b' End', b'\n\n',
           b'### Instruction']
  strategy = scripted_kind(units)
  config = ml_collections.ConfigDict({'model': {'kind': 'baseline'}})
  exported = export_lib.Exported(model=None, params=None, config=config, tokenizer=None,
                                 featurizer=None)
  streamed = []
  reply = generate.chat_reply(exported, [{'role': 'user', 'content': 'Name a colour.'}],
                              template, on_text=streamed.append, max_bytes=200)
  assert reply == 'Blue, like the sea.'
  assert ''.join(streamed) == reply
  assert strategy.picked == 8   # nothing generated after the marker was complete


def test_chat_over_stdin_lines_keeps_the_conversation(scripted_kind, capsys):
  strategy = scripted_kind([b'Yes', b'.', b'\n### End', b'more'])
  config = ml_collections.ConfigDict({'model': {'kind': 'baseline'},
                                      'sft': {'template': 'alpaca', 'markers': ''}})
  exported = export_lib.Exported(model=None, params=None, config=config, tokenizer=None,
                                 featurizer=None)
  replies = generate.run_chat(exported, lines=['Is it blue?\n', '\n', 'Sure?\n'],
                              max_bytes=64)
  assert replies == ['Yes.', 'Yes.']
  template = chat.get_template('alpaca')
  assert strategy.prompts[1] == template.prompt([
      {'role': 'user', 'content': 'Is it blue?'}, {'role': 'assistant', 'content': 'Yes.'},
      {'role': 'user', 'content': 'Sure?'}])
  assert capsys.readouterr().out == 'Yes.\nYes.\n'


def test_stop_watch_cuts_at_the_first_stop_and_respects_max_bytes():
  watch = generate.StopWatch(['Question:', '\n\n'], max_bytes=100)
  assert not watch(b'The answer is 4')
  assert watch(b'.\n\nQuestion: next')
  assert watch.finish(b'The answer is 4.\n\nQuestion: next') == b'The answer is 4.'
  seen = []
  plain = generate.StopWatch([], on_text=seen.append, max_bytes=5)
  plain(b'abc'), plain(b'defg')
  assert plain.finish(b'abcde') == b'abcde' and ''.join(seen) == 'abcde'


def test_chat_needs_an_instruction_tuned_export_or_a_template():
  config = ml_collections.ConfigDict({'model': {'kind': 'baseline'}, 'sft': {'template': ''}})
  from stlm import cli_errors
  with pytest.raises(cli_errors.FlagError, match='--template'):
    generate.chat_template(config)
  assert generate.chat_template(config, 'chat').name == 'chat'


# ---------------------------------------------------------------- end to end


def _sft_run_config(tmp_path, init_from, kind_config=None):
  items = [dict(instruction=f'Repeat the word {w}.', input='' if i % 2 else 'twice',
                output=f'{w} {w}.') for i, w in enumerate(
                    'apple river stone cloud maple ember violet harbor tundra quartz'.split()
                    * 3)]
  c = _instruct_config(_write_items(tmp_path, items), tmp_path, kind_config,
                       steps=3, warmup_steps=1, batch_size=2, eval_every=3, log_every=1,
                       ckpt_every=3, init_from=init_from, compile_cache_dir='')
  return c


@pytest.mark.slow
def test_finetuned_export_reloads_and_scores_identically(tiny_export, tmp_path):
  from stlm.eval import instruct   # pylint: disable=g-import-not-at-top
  c = _sft_run_config(tmp_path, tiny_export)
  final = loop.train(c, str(tmp_path / 'run'))
  exported = export_lib.load_export(str(tmp_path / 'run' / 'export'))
  assert chat.template_of(exported.config) == chat.get_template('alpaca')
  assert exported.config.train.init_from == tiny_export
  scored = instruct.response_bits_per_byte(exported, c.data.path, batch_size=2)
  assert scored['bits_per_byte'] == pytest.approx(final['bits_per_byte'], rel=1e-6)
  assert scored['bytes'] == final['bytes']
  # The base export scores the same held-out targets through the same template.
  base = instruct.response_bits_per_byte(export_lib.load_export(tiny_export), c.data.path,
                                         template='alpaca', val_fraction=0.25, batch_size=2)
  assert base['bytes'] == final['bytes'] and base['items'] == scored['items']


@pytest.mark.slow
def test_byte_pool_finetunes_and_chats(tmp_path, tiny_export):
  from stlm.models import factory  # pylint: disable=g-import-not-at-top
  c = sft_config.get_config('byte_pool')
  c.model.vocab_size = tokenizers.GPT2Tokenizer().vocab_size
  model = factory.build_model(c.model)
  params = tbp.fast_init(model, factory.dummy_batch(c.model, 1, 8))
  base = str(tmp_path / 'base_export')
  export_lib.save_export(base, params, c)
  run = _sft_run_config(tmp_path, base, c)
  final = loop.train(run, str(tmp_path / 'run'))
  assert np.isfinite(final['bits_per_byte'])
  exported = export_lib.load_export(str(tmp_path / 'run' / 'export'))
  streamed = []
  reply = generate.chat_reply(exported, [{'role': 'user', 'content': 'Repeat the word sun.'}],
                              chat.template_of(exported.config), on_text=streamed.append,
                              max_bytes=24, temperature=0.0)
  assert ''.join(streamed) == reply and len(reply) <= 24   # <= 24 bytes, each at most one char
  # A byte-pool run cannot start from the baseline's export.
  other = _sft_run_config(tmp_path, tiny_export, sft_config.get_config('byte_pool'))
  other.model.vocab_size = c.model.vocab_size
  with pytest.raises(checkpoint.CheckpointMismatchError, match='model.kind'):
    loop._check_init_from(other)
