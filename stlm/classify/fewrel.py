"""FewRel N-way K-shot episodes and a prototype classifier over entity-marked encodings.

An episode draws N relations, then K support and Q query instances of each without
replacement (a query is never in its own support set). Each instance is encoded with its
entities marked ([E1] head [/E1], [E2] tail [/E2]); its vector is the concatenation of the
backbone's hidden states at the first token of [E1] and of [E2] (for a causal backbone, which
has not yet seen the entity at its opening marker, at the closing markers). A query takes the
relation whose prototype (mean support vector) is nearest in squared Euclidean distance.
No fine-tuning: the backbone is frozen, so this measures its representations.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from stlm import cli_errors
from stlm.classify import backbone as backbone_lib
from stlm.data import classification as cls_data


@dataclasses.dataclass(frozen=True)
class Episode:
  relations: tuple[str, ...]
  support: tuple[tuple[str, int], ...]   # (relation, instance index), K per relation
  query: tuple[tuple[str, int], ...]     # Q per relation


def sample_episodes(relations: dict[str, list], n_way: int, k_shot: int, n_query: int,
                    n_episodes: int, seed: int) -> list[Episode]:
  """Deterministic for (relations' names and sizes, arguments, seed)."""
  names = sorted(relations)
  if n_way > len(names):
    raise cli_errors.FlagError(f'--fewrel_settings: {n_way}-way episodes need {n_way} '
                               f'relations; the file has {len(names)}')
  for r in names:
    if len(relations[r]) < k_shot + n_query:
      raise cli_errors.FlagError(f'--fewrel_settings / --queries: relation {r} has '
                                 f'{len(relations[r])} instances; {k_shot}-shot with '
                                 f'{n_query} queries needs {k_shot + n_query}')
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n_episodes):
    rels = [names[i] for i in rng.choice(len(names), n_way, replace=False)]
    sup, qry = [], []
    for r in rels:
      idx = rng.choice(len(relations[r]), k_shot + n_query, replace=False)
      sup += [(r, int(i)) for i in idx[:k_shot]]
      qry += [(r, int(i)) for i in idx[k_shot:]]
    out.append(Episode(tuple(rels), tuple(sup), tuple(qry)))
  return out


def _marked_ids(tokenizer, inst: cls_data.RelationInstance, max_len: int, causal: bool):
  """[eot] + ids of the marked sentence, and the positions of the two entity markers."""
  words = cls_data.mark_entities(inst).split(' ')
  ids, at = [tokenizer.eot_id], {}
  for w in words:
    if w in (cls_data.HEAD_MARK, cls_data.TAIL_MARK, '[/E1]', '[/E2]'):
      at[w] = len(ids)
    ids += tokenizer.encode(' ' + w)
  keys = ('[/E1]', '[/E2]') if causal else (cls_data.HEAD_MARK, cls_data.TAIL_MARK)
  marks = [at[k] for k in keys]
  if len(ids) > max_len:
    # Keep a window that holds both markers (FewRel sentences rarely need this).
    start = max(0, min(max(marks) + 2 - max_len, min(marks) - 1))
    ids = [ids[0]] + ids[1 + start:start + max_len]
    marks = [min(max(1, m - start), max_len - 1) for m in marks]
  return ids, marks


def encode_instances(bb: backbone_lib.Backbone, insts, batch_size: int = 64) -> np.ndarray:
  """Entity-marker vectors (N x 2D) of `insts`."""
  causal = bb.kind.causal
  rows = [_marked_ids(bb.tokenizer, x, bb.max_len, causal) for x in insts]
  hidden = jax.jit(backbone_lib.hidden_fn(bb))
  out = []
  for s in range(0, len(rows), batch_size):
    part = rows[s:s + batch_size]
    T = max(len(r[0]) for r in part)
    inputs = np.zeros((len(part), T), np.int32)
    seg = np.zeros((len(part), T), np.int32)
    for i, (ids, _) in enumerate(part):
      inputs[i, :len(ids)], seg[i, :len(ids)] = ids, 1
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), inputs.shape).copy()
    h = np.asarray(hidden(bb.params, {'inputs': inputs, 'segment_ids': seg, 'positions': pos}))
    marks = np.asarray([m for _, m in part])
    rows_idx = np.arange(len(part))[:, None]
    out.append(h[rows_idx, marks].reshape(len(part), -1))
  return np.concatenate(out)


def prototype_predict(support_z, support_labels, query_z, n_way: int) -> np.ndarray:
  """Index of the nearest class mean (squared Euclidean) for each query vector."""
  support_labels = np.asarray(support_labels)
  protos = np.stack([support_z[support_labels == c].mean(0) for c in range(n_way)])
  d = ((query_z[:, None, :] - protos[None]) ** 2).sum(-1)
  return d.argmin(1)


def evaluate(bb: backbone_lib.Backbone, relations: dict[str, list], n_way: int, k_shot: int,
             n_query: int, n_episodes: int, seed: int) -> dict:
  """Mean episode accuracy with its standard error across episodes."""
  episodes = sample_episodes(relations, n_way, k_shot, n_query, n_episodes, seed)
  needed = sorted({key for ep in episodes for key in ep.support + ep.query})
  z = encode_instances(bb, [relations[r][i] for r, i in needed])
  row = {key: j for j, key in enumerate(needed)}
  accs = []
  for ep in episodes:
    cls = {r: c for c, r in enumerate(ep.relations)}
    sz = z[[row[k] for k in ep.support]]
    qz = z[[row[k] for k in ep.query]]
    pred = prototype_predict(sz, [cls[r] for r, _ in ep.support], qz, n_way)
    accs.append(float(np.mean(pred == np.asarray([cls[r] for r, _ in ep.query]))))
  accs = np.asarray(accs)
  se = float(accs.std(ddof=1) / math.sqrt(len(accs))) if len(accs) > 1 else float('nan')
  return {'setting': f'{n_way}w{k_shot}s', 'accuracy': float(accs.mean()), 'stderr': se,
          'n_episodes': len(accs), 'n_test': len(accs) * n_way * n_query,
          'queries_per_class': n_query, 'instances_encoded': len(needed),
          'episode_accuracy': [float(a) for a in accs]}


