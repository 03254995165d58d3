"""Tests for stlm/data/classification.py: every shared file parses with exact counts; errors."""

import collections

import pytest

from stlm.data import classification as cd
from tests.conftest import require_shared_data


def _dir():
  return require_shared_data() / 'classification'


def test_agnews_release_csv():
  ex = cd.load_agnews(_dir() / 'agnews' / 'train_head.csv')
  assert len(ex) == 10429
  assert collections.Counter(ex.labels) == {0: 2630, 1: 2452, 2: 2594, 3: 2753}
  assert ex.labels[0] == 2 and ex.texts[0].startswith('Wall St. Bears Claw Back')
  assert '\\' not in ''.join(ex.texts)          # release newline escapes are undone
  listed = (_dir() / 'agnews' / 'classes.txt').read_text().strip().split(', ')
  assert ex.classes == tuple(item.split('-', 1)[1] for item in listed)


def test_agnews_jointmatch_csv():
  ex = cd.load_task_file('agnews', _dir() / 'agnews' / 'jointmatch_dev_8000.csv')
  assert len(ex) == 8000
  assert collections.Counter(ex.labels) == {c: 2000 for c in range(4)}
  assert ex.labels[0] == 0 and 'Baghdad' in ex.texts[0]   # a World story: ids are 1-4


def test_dbpedia_keaml_and_dhim():
  keaml = cd.load_task_file('dbpedia', _dir() / 'dbpedia' / 'keaml_train_14000.csv')
  assert len(keaml) == 14000
  assert collections.Counter(keaml.labels) == {c: 1000 for c in range(14)}
  assert keaml.classes[keaml.labels[0]] == 'Artist'         # Clifford T. Ward, a singer
  dhim = cd.load_task_file('dbpedia', _dir() / 'dbpedia' / 'dhim_val_5000.csv')
  assert len(dhim) == 5000
  counts = collections.Counter(dhim.labels)
  assert sum(counts.values()) == 5000 and len(counts) == 14
  assert counts[cd.DBPEDIA_CLASSES.index('Artist')] == 376     # dhim id 1 = Artist
  assert dhim.classes[dhim.labels[0]] == 'WrittenWork'     # "Mfumu'eto is a magazine"
  meta_names = set(cd.read_dhim_meta(_dir() / 'dbpedia' / 'dhim_meta.txt').values())
  assert meta_names == set(
      (_dir() / 'dbpedia' / 'classes.txt').read_text().split())


def test_fewrel_json():
  rel = cd.load_fewrel(_dir() / 'fewrel' / 'val_wiki.json')
  assert len(rel) == 16 and all(len(v) == 700 for v in rel.values())
  inst = rel['P177'][0]
  marked = cd.mark_entities(inst)
  assert '[E1] Cape Girardeau Bridge [/E1]' in marked
  assert '[E2] Mississippi River [/E2]' in marked


def test_malformed_rows_name_file_and_line(tmp_path):
  p = tmp_path / 'train.csv'
  p.write_text('"1","a","b"\n"2","only two"\n')
  with pytest.raises(cd.DataFormatError, match=r'train.csv:2: expected 3 fields'):
    cd.load_agnews(p)
  p.write_text('"1","a","b"\n"5","x","y"\n')
  with pytest.raises(cd.DataFormatError, match=r'train.csv:2: label 5 is outside the class '
                     r'list \(1..4'):
    cd.load_agnews(p)
  p.write_text('"1","a","b"\n"x","t","d"\n')
  with pytest.raises(cd.DataFormatError, match=r'train.csv:2: label .x. is not an integer'):
    cd.load_agnews(p)
  d = tmp_path / 'db.csv'
  d.write_text('0,fine\n14,too big\n')
  with pytest.raises(cd.DataFormatError, match=r'db.csv:2: label 14 is outside'):
    cd.load_dbpedia(d)
  f = tmp_path / 'fewrel.json'
  f.write_text('{"P1": [{"tokens": ["a"], "h": ["a", "Q", [[0]]], "t": ["b", "Q", [[3]]]}]}')
  with pytest.raises(cd.DataFormatError, match=r'P1\[0\]: entity indices outside'):
    cd.load_fewrel(f)


def test_dhim_labels_need_their_meta(tmp_path):
  (tmp_path / 'dhim_test_9.csv').write_text('"1","text"\n')
  with pytest.raises(cd.DataFormatError, match='dhim_meta.txt is missing'):
    cd.load_dbpedia_file(tmp_path / 'dhim_test_9.csv')
  (tmp_path / 'dhim_meta.txt').write_text(
      '\n'.join(f'{i + 1}: {c}' for i, c in enumerate(cd.DBPEDIA_CLASSES)) + '\n#train: 1\n')
  (tmp_path / 'dhim_test_9.csv').write_text('"1","text"\n"15","bad"\n')
  with pytest.raises(cd.DataFormatError, match=r'dhim_test_9.csv:2: label .15. is not one of'):
    cd.load_dbpedia_file(tmp_path / 'dhim_test_9.csv')
