"""Generative evaluation: GSM8K answer extraction and scoring, LAMBADA, prompts."""

import functools
import types

import pytest

from stlm import tokenizers
from stlm.eval import generative
from tests import test_generate

REFERENCE = ('Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n'
             'Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72')


@pytest.mark.parametrize('text, strict, flexible', [
    (' She sold 72 clips.\n#### 72', '72', '72'),
    ('#### 1,234\n', '1,234', '1,234'),
    ('The loss is -5 dollars.\n#### -5', '-5', '-5'),
    ('It costs $18.50 in all.', '[invalid]', '$18.50'),
    ('First 3, then 4, so 12.', '[invalid]', '12.'),
    ('no number here', '[invalid]', '[invalid]'),
    ('#### 7 and later 9', '7', '9'),
])
def test_extraction_follows_the_harness_filters(text, strict, flexible):
  assert generative.extract_strict(text) == strict
  assert generative.extract_flexible(text) == flexible


@pytest.mark.parametrize('generated, strict, flexible', [
    (' 48/2 = 24, 48+24 = 72.\n#### 72', 1.0, 1.0),
    (' So 72 clips.', 0.0, 1.0),                 # no '####' line: only flexible finds it
    (' #### 72.', 1.0, 1.0),                     # a trailing '.' is normalised away
    (' #### 71\nthen 72', 0.0, 1.0),
    (' #### 720', 0.0, 0.0),
])
def test_exact_match_against_the_reference(generated, strict, flexible):
  assert generative.gsm8k_exact_match(generated, REFERENCE) == dict(
      exact_match=strict, exact_match_flexible=flexible)


def test_commas_and_dollars_are_ignored_and_negatives_kept():
  reference = 'Working... #### 1234'
  assert generative.gsm8k_exact_match('#### 1,234', reference)['exact_match'] == 1.0
  assert generative.gsm8k_exact_match('It is $1,234', reference)['exact_match_flexible'] == 1.0
  negative = 'so the change is #### -3'
  assert generative.gsm8k_exact_match('#### -3', negative)['exact_match'] == 1.0
  assert generative.gsm8k_exact_match('#### 3', negative)['exact_match'] == 0.0


def test_prompt_and_shots():
  train = [dict(question=f'q{i}', answer=f'a{i}\n#### {i}') for i in range(10)]
  item = train[3]
  shots = generative.gsm8k_shots([item] * 20, train, 5)
  assert all(len(s) == 5 and item not in s for s in shots)
  assert shots == generative.gsm8k_shots([item] * 20, train, 5)   # seeded
  prompt = generative.gsm8k_prompt(item, shots[0][:2])
  s0, s1 = shots[0][:2]
  assert prompt == (f"Question: {s0['question']}\nAnswer: {s0['answer']}\n\n"
                    f"Question: {s1['question']}\nAnswer: {s1['answer']}\n\n"
                    'Question: q3\nAnswer:')


@pytest.mark.parametrize('generated, ok', [(' signs.', 1.0), (' signs', 1.0), ('signs!"', 1.0),
                                           (' sign', 0.0), (' signsx', 0.0), ('', 0.0)])
def test_lambada_first_word(generated, ok):
  assert generative.lambada_correct(generated, 'signs') == ok


def test_missing_gsm8k_split_is_named_before_any_model_loads(tmp_path):
  (tmp_path / 'gsm8k').mkdir()
  (tmp_path / 'gsm8k' / 'train.jsonl').write_text('{"question": "q", "answer": "#### 1"}\n')
  with pytest.raises(generative.loaders.DataError, match='test.jsonl is missing'):
    generative.check_available(['gsm8k'], str(tmp_path))
  generative.check_available(['gsm8k'], str(tmp_path), 'train')


@pytest.mark.filterwarnings('ignore::stlm.generate.ContextTruncated')  # prompts > 40 bytes
def test_scores_and_texts_do_not_depend_on_the_batch_size(shared_data):
  config, model, params = test_generate.batch_baseline()
  exported = types.SimpleNamespace(model=model, params=params, config=config,
                                   tokenizer=tokenizers.ByteTokenizer())
  data_dir = str(shared_data / 'benchmarks')
  gsm8k_train = functools.partial(generative.run_gsm8k, split='train')  # test.jsonl is absent
  for run in (generative.run_lambada, gsm8k_train):
    ticks = []
    one = run(exported, data_dir, limit=5, max_bytes=12, batch_size=1)
    four = run(exported, data_dir, limit=5, max_bytes=12, batch_size=4,
               progress=lambda: ticks.append(1))
    assert one == four and one['n'] == 5 and len(ticks) == 5
    assert any(e['generated'] for e in one['examples'])
