"""A linear head on pooled backbone outputs: whole-model fine-tuning or a linear probe.

Training stops early on a validation split carved from train: accuracy is measured every
`eval_every` steps and training ends after `patience` checks without improvement; the best
checkpoint (by validation accuracy) is the one returned and tested.

The jitted functions are kept per architecture and settings: a study that fine-tunes many
backbones of one shape (seeds, pretraining arms, the scratch arm) compiles each step once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stlm import cli_errors
from stlm.classify import backbone as backbone_lib

MODES = ('finetune', 'probe')


@dataclasses.dataclass
class TrainSettings:
  mode: str = 'finetune'
  pool: str = 'first'
  lr: float = 3e-4            # fine-tuning (the probe uses probe_lr)
  probe_lr: float = 1e-2
  weight_decay: float = 0.01
  batch_size: int = 32
  max_steps: int = 600
  eval_every: int = 50
  patience: int = 4
  dropout: bool = False       # model dropout during fine-tuning (config.model.dropout)
  seed: int = 0


@dataclasses.dataclass
class Classifier:
  """A trained classifier: predict_proba(arrays) -> N x C probabilities (numpy)."""
  backbone: backbone_lib.Backbone
  params: Any                  # {'backbone': ..., 'head': {'w', 'b'}}
  pool: str
  num_classes: int
  history: list
  best_step: int
  train_seconds: float

  @property
  def best_val_accuracy(self) -> float:
    return max((h['val_accuracy'] for h in self.history), default=-1.0)

  def logits_fn(self):
    return _logits_jit(self.backbone, self.pool)

  def predict_proba(self, arrays, batch_size: int = 128) -> np.ndarray:
    f = self.logits_fn()
    out = [np.asarray(jax.nn.softmax(f(self.params, sl), -1))
           for sl in iter_batches(arrays, batch_size)]
    return np.concatenate(out)


def iter_batches(arrays: dict, batch_size: int):
  n = len(next(iter(arrays.values())))
  for s in range(0, n, batch_size):
    yield {k: v[s:s + batch_size] for k, v in arrays.items()}


def take(arrays: dict, idx) -> dict:
  return {k: v[idx] for k, v in arrays.items()}


def accuracy_with_se(pred: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """Accuracy and its binomial standard error sqrt(p (1 - p) / n)."""
  labels = np.asarray(labels)
  if len(labels) == 0:
    raise ValueError('no test examples')
  acc = float(np.mean(np.asarray(pred) == labels))
  return acc, math.sqrt(acc * (1 - acc) / len(labels))


_JITTED: dict = {}   # (what, architecture, settings...) -> a jitted function


def _architecture(bb: backbone_lib.Backbone) -> str:
  """What a jitted function of the backbone depends on: its model config (vocab included)."""
  return json.dumps(bb.config.model.to_dict(), sort_keys=True, default=str)


def _memo(key: tuple, build):
  if key not in _JITTED:
    _JITTED[key] = build()
  return _JITTED[key]


def _pooled_jit(bb: backbone_lib.Backbone, pool: str):
  return _memo(('pooled', _architecture(bb), pool),
               lambda: jax.jit(backbone_lib.pooled_fn(bb, pool)))


def _logits_jit(bb: backbone_lib.Backbone, pool: str):
  def build():
    pooled = backbone_lib.pooled_fn(bb, pool)
    return jax.jit(lambda p, a: pooled(p['backbone'], a) @ p['head']['w'] + p['head']['b'])
  return _memo(('logits', _architecture(bb), pool), build)


def _optimizer(s: TrainSettings) -> optax.GradientTransformation:
  if s.mode == 'probe':
    return optax.adamw(s.probe_lr, weight_decay=s.weight_decay)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.warmup_cosine_decay_schedule(
                         0.0, s.lr, max(1, s.max_steps // 10), s.max_steps, s.lr * 0.1),
                                 weight_decay=s.weight_decay))


def _train_step(bb: backbone_lib.Backbone, pool: str, s: TrainSettings):
  """(optimizer, jitted step(p, o, xb, yb, rng) -> (p, o, loss)) for these settings."""
  def build():
    tx = _optimizer(s)
    if s.mode == 'probe':
      def loss_fn(h, xb, yb, _rng):
        logits = xb['z'] @ h['w'] + h['b']
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    else:
      pooled = backbone_lib.pooled_fn(bb, pool)

      def loss_fn(p, xb, yb, step_rng):
        z = pooled(p['backbone'], xb, step_rng if s.dropout else None)
        logits = z @ p['head']['w'] + p['head']['b']
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(p, o, xb, yb, step_rng):
      loss, g = jax.value_and_grad(loss_fn)(p, xb, yb, step_rng)
      upd, o = tx.update(g, o, p)
      return optax.apply_updates(p, upd), o, loss
    return tx, step
  arch = '' if s.mode == 'probe' else _architecture(bb)   # a probe's step sees vectors only
  return _memo(('step', arch, pool, s.mode, s.lr, s.probe_lr, s.weight_decay, s.max_steps,
                s.dropout), build)


def _init_head(rng, dim: int, num_classes: int):
  return {'w': jax.random.normal(rng, (dim, num_classes), jnp.float32) * (1.0 / math.sqrt(dim)),
          'b': jnp.zeros((num_classes,), jnp.float32)}


def train_classifier(bb: backbone_lib.Backbone, train: dict, train_y, val: dict, val_y,
                     num_classes: int, s: TrainSettings, log=print) -> Classifier:
  """Fine-tunes (or probes) `bb` + a linear head on tokenized `train`, early-stopped on `val`."""
  if s.mode not in MODES:
    raise cli_errors.FlagError(f'--mode={s.mode!r}; choose one of {", ".join(MODES)}')
  pool = bb.pooling(s.pool)
  train_y, val_y = np.asarray(train_y, np.int32), np.asarray(val_y, np.int32)
  rng = jax.random.key(s.seed)
  head = _init_head(jax.random.fold_in(rng, 1), bb.hidden_dim, num_classes)
  np_rng = np.random.default_rng(s.seed)
  t0 = time.perf_counter()

  if s.mode == 'probe':
    # A frozen backbone: pool every example once, then fit the head alone on the vectors.
    feat = _pooled_jit(bb, pool)
    z_tr = np.concatenate([np.asarray(feat(bb.params, b)) for b in iter_batches(train, 128)])
    z_va = np.concatenate([np.asarray(feat(bb.params, b)) for b in iter_batches(val, 128)])
    trainable = head

    def val_pred(h):
      return np.asarray(jnp.argmax(jnp.asarray(z_va) @ h['w'] + h['b'], -1))

    train_x = {'z': z_tr}
    assemble = lambda h: {'backbone': bb.params, 'head': h}
  else:
    trainable = {'backbone': bb.params, 'head': head}
    logits_val = _logits_jit(bb, pool)

    def val_pred(p):
      return np.concatenate([np.asarray(jnp.argmax(logits_val(p, b), -1))
                             for b in iter_batches(val, 128)])

    train_x = train
    assemble = lambda p: p

  tx, step = _train_step(bb, pool, s)
  opt_state = tx.init(trainable)

  n = len(train_y)
  bs = min(s.batch_size, n)
  best_acc, best_step, best, history, bad = -1.0, 0, trainable, [], 0
  order, pos = np_rng.permutation(n), 0
  for it in range(1, s.max_steps + 1):
    if pos + bs > n:
      order, pos = np_rng.permutation(n), 0
    idx = order[pos:pos + bs]
    pos += bs
    trainable, opt_state, loss = step(trainable, opt_state, take(train_x, idx), train_y[idx],
                                      jax.random.fold_in(rng, it))
    if it % s.eval_every == 0 or it == s.max_steps:
      acc = float(np.mean(val_pred(trainable) == val_y))
      history.append({'step': it, 'train_loss': float(loss), 'val_accuracy': acc})
      log(f'  step {it}: train loss {float(loss):.4f}, validation accuracy {acc:.4f}')
      if acc > best_acc:
        best_acc, best_step, bad = acc, it, 0
        best = jax.tree.map(np.asarray, trainable)   # host copy: the step donates nothing
      else:
        bad += 1
        if bad >= s.patience:
          log(f'  early stop at step {it}: best validation accuracy {best_acc:.4f} '
              f'at step {best_step}')
          break
  return Classifier(bb, assemble(best), pool, num_classes, history, best_step,
                    time.perf_counter() - t0)
