"""stlm.compress: quantisation error bounds, exact sparsity, the identity pass, real sizes,
and a compressed export scored by stlm.eval; bad flags give one line naming the flag.

The exports are tiny (1 layer, 32 wide, a 257-byte vocabulary) with random weights, so that
quantisation and pruning have something to do and every case runs in seconds.
"""

import json
import math
import os
import pathlib
import tarfile

import numpy as np
import pytest

from stlm import cli_errors
from stlm import compress
from stlm import export
from stlm.compress import artifact
from stlm.export import codec
from stlm.compress import low_rank
from stlm.compress import prune
from stlm.export import quantize
from tests.test_cli_errors import SMALL, assert_one_line_error, run_command, _tree_state


def _save_random_export(config_module, directory, **model):
  # pylint: disable=g-import-not-at-top  (jax only for the fixture, not at collection)
  import flax.linen as nn
  import jax
  from stlm.models import factory
  c = config_module.get_config('tiny')
  c.tokenizer.kind = 'bytes'
  c.model.update(vocab_size=257, **model)
  abstract = nn.unbox(factory.abstract_params(factory.build_model(c.model), c.model))
  # Random values in every array (no init: nothing to compile), so that the sparsity and
  # error checks mean something for each of them, norm scales included.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(s.dtype), abstract)
  export.save_export(str(directory), params, c)
  return params


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  from configs import baseline, byte_pool  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('exports')
  lm = _save_random_export(baseline, root / 'lm', **SMALL)
  bp = _save_random_export(byte_pool, root / 'bp', num_layers=1)
  (root / 'text.txt').write_text('A short document to score, and a second sentence.\n')
  return dict(root=root, lm=root / 'lm', bp=root / 'bp', lm_params=lm, bp_params=bp)


def _flat(params) -> dict:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep='/').items()}


def _compress(exports, tmp_path, name, src='lm', archive=None, **settings):
  out = tmp_path / name
  result = compress.compress_export(str(exports[src]), str(out), compress.Settings(**settings),
                                    archive=str(archive) if archive else None)
  return out, result


# ---------------------------------------------------------------- quantisation

@pytest.mark.parametrize('bits,group_size', [(8, 0), (8, 16), (4, 0), (4, 16)])
def test_quantize_error_is_within_half_a_step_of_each_group(bits, group_size):
  w_KxN = np.random.default_rng(1).normal(0, 1, (72, 24)).astype(np.float32)
  q, scale_GxN = quantize.quantize(w_KxN, bits, group_size)
  g = group_size or 72
  assert q.dtype == np.int8 and scale_GxN.shape == (math.ceil(72 / g), 24)
  if bits == 4:
    packed = quantize.pack_int4(q)
    assert packed.nbytes == q.size // 2
    np.testing.assert_array_equal(quantize.unpack_int4(packed, q.size).reshape(q.shape), q)
  err_KxN = np.abs(quantize.dequantize(q, scale_GxN, group_size) - w_KxN)
  for start in range(0, 72, g):
    group_max_N = np.abs(w_KxN[start:start + g]).max(axis=0)
    bound_N = group_max_N / (2 * quantize.QMAX[bits])
    assert (err_KxN[start:start + g] <= bound_N * (1 + 1e-6) + 1e-7).all()
  assert quantize.dequantize(*quantize.quantize(np.zeros((4, 3)), bits, 0), 0).sum() == 0


@pytest.mark.parametrize('src', ['lm', 'bp'])
def test_int8_export_round_trip_error_per_matrix(exports, tmp_path, src):
  """Every compressed matrix comes back within max|w| / 254 of each of its channels (a table:
  of each row); vectors are untouched."""
  out, result = _compress(exports, tmp_path, 'int8', src=src, quantize='int8')
  before, after = _flat(exports[f'{src}_params']), _flat(export.load_export(str(out)).params)
  assert sorted(before) == sorted(after)
  compressed = set(result['params'])
  assert compressed == set(result['summary']['selected']) and compressed
  for path, w in before.items():
    if path not in compressed:
      np.testing.assert_array_equal(after[path], w)
      assert w.ndim == 1
      continue
    assert after[path].dtype == np.float32 and after[path].shape == w.shape
    k, n = codec.matrix_shape(w.shape)
    w_KxN, err_KxN = w.reshape(k, n), np.abs(after[path] - w).reshape(k, n)
    axis = 1 if compress.param_class(path, w.shape) in ('embedding', 'byte_table') else 0
    bound = np.abs(w_KxN).max(axis=axis, keepdims=True) / 254
    assert (err_KxN <= bound * (1 + 1e-6) + 1e-8).all(), path
    assert err_KxN.max() > 0, path   # it was really quantised


def test_int4_and_bf16_exports_are_stored_small_and_load(exports, tmp_path):
  fp32, _ = _compress(exports, tmp_path, 'fp32')
  sizes = {}
  for name, settings in (('bf16', dict(quantize='bf16')), ('int8', dict(quantize='int8')),
                         ('int4', dict(quantize='int4', group_size=16))):
    out, result = _compress(exports, tmp_path, name, **settings)
    sizes[name] = result['size']['bytes']
    loaded = _flat(export.load_export(str(out)).params)
    assert all(v.dtype == np.float32 for v in loaded.values())
  data = lambda d: sum(s for rel, s in artifact.files(str(d)).items() if '/d/' in rel)
  base = data(fp32)
  assert data(tmp_path / 'int4') < data(tmp_path / 'int8') < data(tmp_path / 'bf16') < base


def test_tables_can_be_left_out(exports, tmp_path):
  _, result = _compress(exports, tmp_path, 'no_tables', src='bp', quantize='int8',
                        embeddings=False, byte_tables=False)
  for path in result['params']:
    assert 'ngram' not in path and not path.endswith('embedding')
  assert any(p.startswith('core/') for p in result['params'])
  assert '(not embeddings, byte tables)' in result['label']


# --------------------------------------------------------------------- pruning

def test_keep_masks_are_exact_even_with_ties():
  arrays = {'a': np.ones((10, 10)), 'b': np.arange(30.0).reshape(5, 6)}
  layer = prune.keep_masks(arrays, 0.37, 'layer')
  assert (~layer['a']).sum() == 37 and (~layer['b']).sum() == round(0.37 * 30)
  glob = prune.keep_masks(arrays, 0.5, 'global')
  assert sum((~m).sum() for m in glob.values()) == 65


@pytest.mark.parametrize('sparsity,scope', [(0.5, 'layer'), (0.9, 'layer'), (0.5, 'global'),
                                            (0.9, 'global')])
def test_pruned_export_has_the_requested_sparsity(exports, tmp_path, sparsity, scope):
  out, result = _compress(exports, tmp_path, f'p{sparsity}{scope}', prune=sparsity,
                          prune_scope=scope)
  before, after = _flat(exports['lm_params']), _flat(export.load_export(str(out)).params)
  chosen = result['summary']['selected']
  zeros = {p: int((after[p] == 0).sum()) for p in chosen}
  if scope == 'layer':   # each array to the target on its own
    for p in chosen:
      assert zeros[p] == round(sparsity * after[p].size), p
  else:                  # all of them together
    assert sum(zeros.values()) == round(sparsity * sum(after[p].size for p in chosen))
  assert sum(zeros.values()) == result['summary']['pruned']['zeroed']
  for p in chosen:   # what stays is the original weight, and it is the largest ones
    kept = after[p] != 0
    np.testing.assert_array_equal(after[p][kept], before[p][kept])
    if scope == 'layer':
      assert np.abs(before[p][~kept]).max() <= np.abs(before[p][kept]).min()
  # Stored as mask bits + kept values: the params take less room than dense float32.
  data = lambda d: sum(s for rel, s in artifact.files(str(d)).items() if '/d/' in rel)
  fp32, _ = _compress(exports, tmp_path, 'fp32')
  assert data(out) < data(fp32) * (1 - sparsity / 2)
  assert all(result['params'][p]['kind'] == 'sparse' for p in chosen)


# -------------------------------------------------------------------- low rank

def test_low_rank_factors_hit_rank_and_energy_targets():
  rng = np.random.default_rng(2)
  w_KxN = (rng.normal(size=(40, 3)) @ rng.normal(size=(3, 30))).astype(np.float32)
  a, b, r = low_rank.factor(w_KxN, rank=3)
  assert (a.shape, b.shape, r) == ((40, 3), (3, 30), 3)
  np.testing.assert_allclose(a @ b, w_KxN, atol=1e-4)
  assert low_rank.factor(w_KxN, energy=0.999999)[2] == 3
  assert low_rank.rank_for_energy(np.array([3.0, 4.0]), 9 / 25) == 1
  assert low_rank.rank_for_energy(np.array([3.0, 4.0]), 0.37) == 2


def test_low_rank_export_stores_factors_and_multiplies_back(exports, tmp_path):
  out, result = _compress(exports, tmp_path, 'lr', low_rank=['*ffn*'], rank=4)
  factored = result['summary']['factored']
  assert factored and all('ffn' in p and r == 4 for p, r in factored.items())
  after = _flat(export.load_export(str(out)).params)
  before = _flat(exports['lm_params'])
  for p in factored:
    k, n = codec.matrix_shape(before[p].shape)
    assert np.linalg.matrix_rank(after[p].reshape(k, n), tol=1e-5) == 4
    spec = result['params'][p]
    assert spec['kind'] == 'low_rank' and spec['rank'] == 4
  fp32, _ = _compress(exports, tmp_path, 'fp32')
  assert result['size']['bytes'] < artifact.sizes(str(fp32))['bytes']


# ------------------------------------------------------- identity, sizes, loading

def test_everything_off_is_bit_identical(exports, tmp_path):
  out, result = _compress(exports, tmp_path, 'same')
  assert result['params'] == {} and result['label'] == 'fp32'
  src = exports['lm']
  for rel in artifact.files(str(src)):
    assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
  assert set(artifact.files(str(out))) == set(artifact.files(str(src))) | {codec.MANIFEST}
  before, after = _flat(exports['lm_params']), _flat(export.load_export(str(out)).params)
  for path, w in before.items():
    assert after[path].dtype == w.dtype
    assert after[path].tobytes() == w.tobytes(), path


def test_size_figures_are_the_files_real_sizes(exports, tmp_path):
  archive = tmp_path / 'int4.tar.xz'
  out, result = _compress(exports, tmp_path, 'int4', archive=archive, quantize='int4',
                          prune=0.5)
  on_disk = {}
  for root, _, names in os.walk(out):
    for name in names:
      full = pathlib.Path(root, name)
      on_disk[str(full.relative_to(out))] = full.stat().st_size
  assert artifact.SIZE_FILE in on_disk
  del on_disk[artifact.SIZE_FILE]   # the record of the measurement, not part of the model
  record = json.loads((out / artifact.SIZE_FILE).read_text())
  assert record == result['size'] and record['files'] == on_disk
  assert record['bytes'] == sum(on_disk.values())
  assert record['xz_bytes'] == archive.stat().st_size
  with tarfile.open(archive, 'r:xz') as tar:   # the archive is the export, file for file
    members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
  assert sorted(members) == sorted(on_disk)
  assert all(members[rel] == (out / rel).read_bytes() for rel in members)
  assert artifact.sizes(str(out)) == record
  (out / 'config.json').write_text((out / 'config.json').read_text() + ' ')
  assert artifact.sizes(str(out))['bytes'] == record['bytes'] + 1   # a stale record is redone


def test_compressed_export_loads_and_scores_through_stlm_eval(exports, tmp_path):
  out, _ = _compress(exports, tmp_path, 'int4_export', quantize='int4', group_size=16,
                     prune=0.5)
  results = tmp_path / 'results.json'
  proc = run_command('stlm.eval', [f'--checkpoint={out}', '--benchmarks=',
                                   f'--text={exports["root"] / "text.txt"}',
                                   f'--output={results}'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  bpb = json.loads(results.read_text())['perplexity']['bits_per_byte']
  # pylint: disable=g-import-not-at-top
  from stlm.eval import perplexity
  from stlm.eval import zero_shot
  text = perplexity.read_documents([str(exports['root'] / 'text.txt')])   # as stlm.eval reads
  exported = export.load_export(str(out))
  assert bpb == pytest.approx(perplexity.perplexity(zero_shot.make_scorer(exported), text)
                              ['bits_per_byte'], rel=1e-5)
  original = export.load_export(str(exports['lm']))
  assert bpb != perplexity.perplexity(zero_shot.make_scorer(original), text)['bits_per_byte']
  from stlm import generate   # and it generates, greedily, as any export does
  assert len(generate.generate_text(exported, 'A', max_bytes=8, temperature=0).encode(
      'utf-8', 'surrogateescape')) >= 1


def test_damaged_manifest_is_named(exports, tmp_path):
  out, _ = _compress(exports, tmp_path, 'int8', quantize='int8')
  (out / codec.MANIFEST).write_text('{"params": ')
  with pytest.raises(export.BadExportError, match='compression.json is not valid JSON'):
    export.check_export(str(out), '--checkpoint')


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize('settings,fragment', [
    (dict(quantize='int3'), '--quantize=int3: unknown method'),
    (dict(prune=1.0), '--prune=1.0 must be in [0, 1)'),
    (dict(prune=-0.1), '--prune=-0.1 must be in [0, 1)'),
    (dict(low_rank=('*',), rank=0), '--rank=0 must be >= 1'),
    (dict(low_rank=('*',), rank=4, energy=0.9), 'needs exactly one of --rank and --energy'),
    (dict(energy=1.5, low_rank=('*',)), '--energy=1.5 must be in (0, 1]'),
    (dict(rank=4), '--rank needs --low_rank'),
    (dict(group_size=-1, quantize='int8'), '--group_size=-1 must be >= 0'),
    (dict(group_size=16), '--group_size=16 needs --quantize=int8 or int4'),
    (dict(prune=0.5, prune_scope='model'), '--prune_scope=model'),
])
def test_bad_settings_name_their_flag(settings, fragment):
  with pytest.raises(cli_errors.FlagError) as e:
    compress.Settings(**settings).check()
  assert fragment in str(e.value)


def test_out_that_the_tool_did_not_make_is_never_overwritten(exports, tmp_path):
  with pytest.raises(cli_errors.FlagError, match='did not write'):
    compress.compress_export(str(exports['lm']), str(exports['bp']),
                             compress.Settings(quantize='int8'))
  with pytest.raises(cli_errors.FlagError, match='inside the --checkpoint export'):
    compress.compress_export(str(exports['lm']), str(exports['lm'] / 'int8'),
                             compress.Settings(quantize='int8'))
  out, _ = _compress(exports, tmp_path, 'again', quantize='int8')
  with pytest.raises(cli_errors.FlagError, match='already a compressed export'):
    compress.compress_export(str(out), str(tmp_path / 'twice'), compress.Settings())
  _, result = _compress(exports, tmp_path, 'again', quantize='int4')   # its own: replaced
  assert result['label'] == 'int4' and codec.read_manifest(str(out))['label'] == 'int4'
  assert sorted(os.listdir(tmp_path)) == ['again']


@pytest.mark.parametrize('args,fragment', [
    (['--quantize=int3'], '--quantize=int3: unknown method'),
    pytest.param(['--prune=1'], '--prune=1.0 must be in [0, 1)', marks=pytest.mark.slow),
    pytest.param(['--low_rank=*', '--rank=0'], '--rank=0 must be >= 1', marks=pytest.mark.slow),
    pytest.param(['--out={bp}', '--quantize=int8'], '--out={bp} exists and holds files '
                 'stlm.compress did not write', marks=pytest.mark.slow),
])
def test_cli_bad_input_gives_one_line_and_changes_nothing(exports, tmp_path, args, fragment):
  names = dict(bp=exports['bp'])
  args = [a.format(**names) for a in args]
  if not any(a.startswith('--out=') for a in args):
    args.append(f'--out={tmp_path / "out"}')
  before = (_tree_state(exports['root']), _tree_state(tmp_path))
  proc = run_command('stlm.compress', [f'--checkpoint={exports["lm"]}', *args])
  assert_one_line_error(proc, fragment.format(**names))
  assert (_tree_state(exports['root']), _tree_state(tmp_path)) == before
