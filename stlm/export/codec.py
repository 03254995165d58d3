"""How a compressed export stores its arrays, and how they are decoded on load.

A compressed export is an ordinary export (config.json, params/ through Orbax,
params_files.json) plus `compression.json`. Its params tree has the model's paths, but an
array that was compressed is replaced by the parts it is stored as, and compression.json
gives, for each such path, the recipe (a "spec") that rebuilds it:

- {"kind": "array"}: stored as it is;
- {"kind": "cast", "dtype"}: stored in a narrower float type (bfloat16), cast back;
- {"kind": "int", "bits", "group_size", "layout", "shape", "dtype"}: parts `q` (int8, or
  uint8 holding two int4 values a byte) and `scale` (float32), see quantize.py; layout
  "columns" puts the scales on the columns of the array's matrix view, "rows" (lookup
  tables, read a row at a time) on its rows;
- {"kind": "sparse", "shape", "dtype", "count", "values"}: parts `mask` (one bit a weight,
  set where it was kept) and `values` (the kept weights, in order, themselves a spec);
- {"kind": "low_rank", "shape", "dtype", "rank", "a", "b"}: parts `a` and `b`, the factors
  of the matrix view (specs of their own), multiplied back.

Decoding gives the model's float32 arrays: a compressed export is dequantised on load, so
every command that loads an export runs it unchanged, at the memory and speed of the
original; what shrinks is the file on disk.
"""

from __future__ import annotations

import json
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from stlm.export import quantize as quantize_lib

MANIFEST = 'compression.json'
FORMAT = 1
SEP = '/'


class ManifestError(ValueError):
  """compression.json is unreadable or does not describe the stored params."""


def matrix_shape(shape) -> tuple[int, int]:
  """The array seen as a matrix K x N: split its axes where the matrix is most nearly square.

  This is the input x output split of every kernel here (q: D | H Dh, o: H Dh | D, FFN: D |
  F), without naming them."""
  shape = tuple(int(d) for d in shape)
  if len(shape) < 2:
    raise ValueError(f'shape {shape} is not a matrix')
  best = None
  for i in range(1, len(shape)):
    k, n = int(np.prod(shape[:i])), int(np.prod(shape[i:]))
    if best is None or min(k, n) > min(best):
      best = (k, n)
  return best


def read_manifest(directory: str) -> dict | None:
  """compression.json of an export, or None for an export that was not compressed."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise ManifestError(f'{path} is not valid JSON ({e})') from None
  if not isinstance(manifest, dict) or not isinstance(manifest.get('params'), dict):
    raise ManifestError(f'{path} has no "params" section')
  if manifest.get('format') != FORMAT:
    raise ManifestError(f'{path} is format {manifest.get("format")!r}; this checkout reads '
                        f'format {FORMAT}')
  return manifest


# ------------------------------------------------------------------------ encoding

def encode_array(w):
  return np.asarray(w), {'kind': 'array'}


def encode_cast(w, dtype: str):
  return np.asarray(w).astype(_dtype(dtype)), {'kind': 'cast', 'dtype': str(np.asarray(w).dtype)}


def encode_int(w, bits: int, group_size: int, layout: str):
  w = np.asarray(w)
  k, n = matrix_shape(w.shape)
  m_KxN = w.reshape(k, n).astype(np.float32)
  if layout == 'rows':
    m_KxN = m_KxN.T
  q, scale = quantize_lib.quantize(m_KxN, bits, group_size)
  parts = {'q': quantize_lib.pack_int4(q) if bits == 4 else q, 'scale': scale}
  return parts, {'kind': 'int', 'bits': bits, 'group_size': group_size, 'layout': layout,
                 'shape': list(w.shape), 'dtype': str(w.dtype)}


def encode_sparse(w, keep, encode_values):
  """`keep` (bool, w's shape) as bits, and the kept weights through `encode_values`."""
  w, keep = np.asarray(w), np.asarray(keep, bool)
  values, values_spec = encode_values(w.ravel()[keep.ravel()])
  parts = {'mask': np.packbits(keep.ravel()), 'values': values}
  return parts, {'kind': 'sparse', 'shape': list(w.shape), 'dtype': str(w.dtype),
                 'count': int(keep.sum()), 'values': values_spec}


def encode_low_rank(w, a_KxR, b_RxN, encode_a, encode_b):
  a, a_spec = encode_a(a_KxR)
  b, b_spec = encode_b(b_RxN)
  w = np.asarray(w)
  return {'a': a, 'b': b}, {'kind': 'low_rank', 'shape': list(w.shape), 'dtype': str(w.dtype),
                            'rank': int(a_KxR.shape[1]), 'a': a_spec, 'b': b_spec}


# ------------------------------------------------------------------------ decoding

def _dtype(name: str):
  return np.dtype(jnp.bfloat16) if name == 'bfloat16' else np.dtype(name)


def decode(stored, spec: dict) -> np.ndarray:
  """The array that `stored` (an array, or a dict of parts) and its spec rebuild."""
  kind = spec['kind']
  if kind == 'array':
    return np.asarray(stored)
  if kind == 'cast':
    return np.asarray(stored).astype(_dtype(spec['dtype']))
  shape = tuple(spec['shape'])
  if kind == 'int':
    k, n = matrix_shape(shape)
    if spec['layout'] == 'rows':
      k, n = n, k
    q = np.asarray(stored['q'])
    q_KxN = (quantize_lib.unpack_int4(q, k * n) if spec['bits'] == 4 else q).reshape(k, n)
    m_KxN = quantize_lib.dequantize(q_KxN, stored['scale'], spec['group_size'])
    if spec['layout'] == 'rows':
      m_KxN = m_KxN.T
    return m_KxN.reshape(shape).astype(_dtype(spec['dtype']))
  if kind == 'sparse':
    size = int(np.prod(shape))
    keep = np.unpackbits(np.asarray(stored['mask'], np.uint8), count=size).astype(bool)
    out = np.zeros(size, _dtype(spec['dtype']))
    out[keep] = decode(stored['values'], spec['values'])
    return out.reshape(shape)
  if kind == 'low_rank':
    a_KxR = decode(stored['a'], spec['a']).astype(np.float32)
    b_RxN = decode(stored['b'], spec['b']).astype(np.float32)
    return (a_KxR @ b_RxN).reshape(shape).astype(_dtype(spec['dtype']))
  raise ManifestError(f'unknown stored kind {kind!r}')


def _decoded_dtype(spec: dict, stored_dtype) -> np.dtype:
  if spec['kind'] == 'array':
    return np.dtype(stored_dtype)
  return _dtype(spec['dtype'])


def decoded_abstract(stored_meta, manifest: dict):
  """Shapes and dtypes of the decoded params, from the stored tree's metadata (any leaves
  with .shape and .dtype) and the manifest; reads no array. ManifestError where they
  disagree."""
  flat = traverse_util.flatten_dict(stored_meta, sep=SEP)
  for path, spec in sorted(manifest['params'].items()):
    if spec['kind'] in ('array', 'cast'):
      if path not in flat:
        raise ManifestError(f'{MANIFEST} names {path}, which the params do not hold')
      flat[path] = jax.ShapeDtypeStruct(tuple(flat[path].shape),
                                        _decoded_dtype(spec, flat[path].dtype))
      continue
    parts = [key for key in flat if key.startswith(path + SEP)]
    if not parts:
      raise ManifestError(f'{MANIFEST} names {path}, whose parts the params do not hold')
    for key in parts:
      del flat[key]
    flat[path] = jax.ShapeDtypeStruct(tuple(spec['shape']), _dtype(spec['dtype']))
  flat = {k: v if isinstance(v, jax.ShapeDtypeStruct) else
          jax.ShapeDtypeStruct(tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat, sep=SEP)


def decode_params(stored, manifest: dict):
  """The model's params from the stored tree (nested dicts of arrays) and the manifest."""
  flat = traverse_util.flatten_dict(stored, sep=SEP)
  for path, spec in manifest['params'].items():
    if spec['kind'] in ('array', 'cast'):
      flat[path] = decode(flat[path], spec)
      continue
    prefix = path + SEP
    parts = {k[len(prefix):]: flat.pop(k) for k in [k for k in flat if k.startswith(prefix)]}
    flat[path] = decode(traverse_util.unflatten_dict(parts, sep=SEP), spec)
  return traverse_util.unflatten_dict(flat, sep=SEP)
