"""Orbax checkpoints of one run: train state, data-iterator position and config, together.

A workdir belongs to one config: resuming with a config that differs in anything but the
keys below stops with the differing keys named, and nothing in the workdir is overwritten.

Integrity: saves are atomic (Orbax writes <step>.orbax-checkpoint-tmp-* and renames it once
every file is written, so a kill mid-save leaves no step directory). Once a save has finished,
each process records the size of every file it wrote in <step>/stlm_files.process_<i>.json. On
restore a checkpoint is damaged when a listed file is missing or has another size, a required
Orbax file is missing or empty, a JSON item does not parse, or the restore itself fails reading
it; the message names the step and the file. With train.restore_fallback the damaged step is
moved aside to <step>.damaged (never deleted) and the previous one is tried.
"""

import glob
import json
import os
import shutil

import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from stlm import export as export_lib
from stlm.config import legacy
from stlm.models import kinds
from stlm.train import disk

# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_KEYS = frozenset({
    'train.steps', 'train.log_every', 'train.eval_every', 'train.eval_batches',
    'train.ckpt_every', 'train.keep_checkpoints', 'train.final_eval_benchmarks',
    'train.final_eval_data_dir', 'data.num_workers', 'data.num_threads', 'data.data_dir', 'mesh.shape',
    'model.attention_impl', 'train.nonfinite_policy', 'train.max_consecutive_skips',
    'train.restore_fallback', 'train.lease_stale_s',
    # What is measured along the way, not what is trained.
    'train.eval_benchmarks', 'train.eval_benchmarks_every', 'train.eval_benchmarks_limit',
    'train.eval_benchmarks_batch',
    # Where metrics go, not what is trained: W&B can be switched on or off on resume.
    'train.wandb_project', 'train.wandb_mode', 'train.wandb_entity',
})

# Files every complete checkpoint of this layout has (relative to <step>/), and the JSON ones.
_REQUIRED = ('_CHECKPOINT_METADATA', 'state/_METADATA', 'state/manifest.ocdbt', 'config/metadata')
_JSON_FILES = ('_CHECKPOINT_METADATA', 'state/_METADATA', 'config/metadata')
_MANIFEST = 'stlm_files.process_{}.json'
DAMAGED_SUFFIX = '.damaged'


class CheckpointMismatchError(ValueError):
  """The workdir holds checkpoints of a different config."""


class CheckpointWriteError(RuntimeError):
  """A save failed for lack of room or permission; its partial files are removed and the
  older checkpoints kept."""

  def __init__(self, step: int, directory: str, reason: str, kept):
    kept_text = f'checkpoint {kept} is kept' if kept is not None else 'no earlier checkpoint'
    super().__init__(f'saving checkpoint {step} in {directory} failed: {reason}; its partial '
                     f'files were removed and {kept_text}. Free space (or fix permissions) '
                     'and run the same command again to resume.')
    self.step = step


class DamagedCheckpointError(RuntimeError):
  """A checkpoint whose files are missing, truncated or unreadable; names step and file."""

  def __init__(self, step: int, path: str, why: str):
    super().__init__(f'checkpoint {step} is damaged: {path}: {why}')
    self.step, self.path, self.why = step, path, why


def _all_files(step_dir: str) -> dict[str, int]:
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, step_dir)
      if not (name.startswith('stlm_files.') and root == step_dir):
        out[rel] = os.path.getsize(full)
  return out


def write_file_manifest(step_dir: str) -> None:
  """Records this process's view of a finished checkpoint: {relative path: size}."""
  path = os.path.join(step_dir, _MANIFEST.format(jax.process_index()))
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(_all_files(step_dir), f, sort_keys=True)
  os.replace(tmp, path)


def verify_files(step: int, step_dir: str) -> None:
  """Raises DamagedCheckpointError naming the first bad file of a checkpoint directory."""
  for rel in _REQUIRED:
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      raise DamagedCheckpointError(step, full, 'missing')
    if os.path.getsize(full) == 0:
      raise DamagedCheckpointError(step, full, 'empty')
  data_dir = os.path.join(step_dir, 'data')
  jsons = [os.path.join(step_dir, rel) for rel in _JSON_FILES]
  if os.path.isdir(data_dir):
    jsons += [os.path.join(data_dir, n) for n in sorted(os.listdir(data_dir))
              if n.endswith('.json')]
  for full in jsons:
    try:
      with open(full, encoding='utf-8') as f:
        json.load(f)
    except FileNotFoundError:
      raise DamagedCheckpointError(step, full, 'missing') from None
    except (ValueError, UnicodeDecodeError) as e:
      raise DamagedCheckpointError(step, full, f'not valid JSON ({e})') from None
  manifest = os.path.join(step_dir, _MANIFEST.format(jax.process_index()))
  if not os.path.isfile(manifest):
    return  # killed between the commit and the manifest: only the checks above apply
  try:
    with open(manifest, encoding='utf-8') as f:
      expected = json.load(f)
  except ValueError:
    return  # a manifest cut short says nothing about the checkpoint itself
  for rel, size in sorted(expected.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      raise DamagedCheckpointError(step, full, 'missing')
    actual = os.path.getsize(full)
    if actual != size:
      raise DamagedCheckpointError(step, full, f'{actual} bytes, {size} were written')


def _all_processes_ok(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(int(ok)).all())


def flatten_config(cfg) -> dict:
  """{'model.hidden_dim': 512, ...} with tuples as lists so JSON round trips compare equal."""
  as_dict = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg
  flat = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if isinstance(value, dict):
        walk(name + '.', value)
      else:
        flat[name] = list(value) if isinstance(value, tuple) else value

  walk('', as_dict)
  return flat


def config_differences(saved: dict, current) -> list[str]:
  """'key: checkpoint has X, this run has Y' for every key that changes what is trained.

  Skipped: RESUMABLE_KEYS and keys of the config sections other model kinds own. A key
  the checkpoint lacks (written by code before the key existed) counts as what that code
  did: its `config.LEGACY_VALUES` entry, else its schema default (`legacy.upgrade`).
  """
  a, b = flatten_config(legacy.upgrade(saved)), flatten_config(current)
  unused = kinds.foreign_config_sections(b['model.kind']) if 'model.kind' in b else ()
  out = []
  for k in sorted(set(a) | set(b)):
    if k in RESUMABLE_KEYS or (unused and k.startswith(unused)):
      continue
    old = a.get(k)
    if old != b.get(k):
      out.append(f'{k}: checkpoint has {old!r}, this run has {b.get(k)!r}')
  return out


# What an export that starts a run (train.init_from) must share with it: the params' shapes
# and meaning. Everything else (data, schedule, steps, sft, seed, mesh) may differ.
INIT_FROM_SECTIONS = ('model.', 'tokenizer.')


def init_from_differences(saved: dict, current) -> list[str]:
  """`config_differences` restricted to INIT_FROM_SECTIONS (the sentencepiece model's path
  excepted: an export carries its own copy)."""
  return [d for d in config_differences(saved, current)
          if d.startswith(INIT_FROM_SECTIONS) and not d.startswith('tokenizer.sp_model_path')]


class RunCheckpoints:
  """Keep-last-N async checkpoints under <workdir>/checkpoints."""

  def __init__(self, workdir: str, config, *, keep: int, async_save: bool = True,
               corpus: dict | None = None):
    """corpus: the data's fingerprint (tfds_builders.fingerprint), saved with every checkpoint
    and compared on resume; None saves and checks none."""
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.config = config
    self.corpus = corpus
    self._saving = -1       # the step of the save in flight (an async error names it)
    self._failed = False    # a save failed: the manager's thread holds that error
    self._unrecorded = []  # saved steps whose file manifest is not written yet
    self._quiet = disk.QuietIoFailures().install()   # a failed save reports in one line
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=('state', 'data', 'config', 'corpus'),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler(),
                       'corpus': ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _first_intact_looking(self):
    """(newest step whose files pass verify_files, [DamagedCheckpointError of newer ones])."""
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        verify_files(step, self.step_dir(step))
        ok = True
      except DamagedCheckpointError as e:
        damaged.append(e)
        ok = False
      if _all_processes_ok(ok):
        return step, damaged
    return None, damaged

  def check_config(self) -> None:
    """Raises CheckpointMismatchError if the newest readable checkpoint is of another config.

    Every checkpoint of a workdir holds the same run's config, so when the newest one's config
    item cannot be read (restore() then reports that checkpoint as damaged), the next older
    readable one is compared instead: a damaged file never lets another config resume here.
    """
    saved, step = None, None
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        break
      except Exception:  # pylint: disable=broad-exception-caught
        continue  # unreadable here: try the next older checkpoint's copy
    if saved is None:
      return  # no readable config at all: restore() reports every checkpoint as damaged
    diffs = config_differences(saved['config'], self.config)
    if diffs:
      raise CheckpointMismatchError(
          f'{self.directory} holds checkpoints (step {step}) of a different config; refusing to '
          'resume or overwrite them. Use another --workdir, or restore these values:\n  '
          + '\n  '.join(diffs))
    self._check_corpus(step)

  def _check_corpus(self, step: int) -> None:
    """The corpus fingerprint saved with checkpoint `step` (none in checkpoints of older code)
    must equal this run's."""
    if self.corpus is None:
      return
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(corpus=ocp.args.JsonRestore()))
    except Exception:  # pylint: disable=broad-exception-caught  (no corpus item: older code)
      return
    if saved['corpus'] != self.corpus:
      raise CheckpointMismatchError(
          f'the corpus changed since checkpoint {step} in {self.directory} (its files, sizes or '
          f'times): checkpoint has {saved["corpus"]}, this run finds {self.corpus}. Resuming '
          'would silently change the data order; restore the corpus or use another --workdir.')

  def restore(self, abstract_state, data_iter):
    """Restores the latest checkpoint (no fallback): the state; the data iterator in place."""
    return self.restore_intact(abstract_state, data_iter, fallback=False)[0]

  def restore_intact(self, abstract_state, data_iter, *, fallback: bool = True, log=print):
    """Restores the newest intact checkpoint: (state, step), or (None, 0) if there is none.

    The data iterator is restored in place. A damaged checkpoint raises DamagedCheckpointError,
    or with `fallback` is moved aside to <step>.damaged (reported through `log`) and the
    previous one is tried.
    """
    while True:
      step, damaged = self._first_intact_looking()
      error = damaged[0] if damaged else None
      if error is None and step is not None:
        try:
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=grain.checkpoint.CheckpointRestore(data_iter)))
          ok = True
        except Exception as e:  # pylint: disable=broad-exception-caught
          if not export_lib.looks_like_damage(e):
            raise  # a bug, not a bad file: moving checkpoints aside would not help
          error = DamagedCheckpointError(step, os.path.join(self.step_dir(step), 'state'),
                                         f'restore failed: {export_lib.first_error_line(e)}')
          ok = False
        if _all_processes_ok(ok):
          return restored['state'], step
      if error is None:
        return None, 0
      if not fallback:
        raise DamagedCheckpointError(
            error.step, error.path, error.why + '; set config.train.restore_fallback=true to '
            'resume from the newest intact checkpoint instead') from None
      aside = self._move_aside(error.step)
      log(f'{error}; moved it aside to {aside} and falling back to the previous checkpoint')

  def _move_aside(self, step: int) -> str:
    src = self.step_dir(step)
    dst, n = src + DAMAGED_SUFFIX, 1
    while os.path.exists(dst):
      dst, n = f'{src}{DAMAGED_SUFFIX}.{n}', n + 1
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'stlm: checkpoint {step} moved aside')
    self.manager.reload()
    return dst

  def _record_finished(self) -> None:
    """Writes the file manifest of every save that has finished (call after waiting)."""
    for step in self._unrecorded:
      if os.path.isdir(self.step_dir(step)):   # not garbage-collected by max_to_keep
        write_file_manifest(self.step_dir(step))
    self._unrecorded = []

  def space_shortfall(self, state) -> str | None:
    """disk.shortfall for the next save (sized like the newest checkpoint, else the state),
    on any process; None when every process has room."""
    newest = self.latest_step()
    estimate = disk.tree_bytes(self.step_dir(newest)) if newest is not None else 0
    why = disk.shortfall(self.directory, estimate or disk.state_bytes(state))
    if _all_processes_ok(why is None):
      return None
    return why or 'another process has too little free space for the next checkpoint'

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    # Orbax waits for the previous async save before starting this one anyway.
    self.wait()
    self._saving = step
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iter),
          config=ocp.args.JsonSave(json.loads(self.config.to_json())),
          **({'corpus': ocp.args.JsonSave(self.corpus)} if self.corpus is not None else {})),
          force=force)
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._raise_write_error(step, e)
    if saved:
      self._unrecorded.append(step)
    return saved

  def _raise_write_error(self, step: int, error: BaseException):
    """A save's I/O failure -> its partial files removed, CheckpointWriteError; else re-raise."""
    if not disk.is_io_error(error):
      raise error
    self._failed = True
    partial = glob.glob(glob.escape(self.step_dir(step)) + '.orbax-checkpoint-tmp*')
    if not os.path.exists(os.path.join(self.step_dir(step), '_CHECKPOINT_METADATA')):
      partial.append(self.step_dir(step))   # never finalised
    if jax.process_index() == 0:
      for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    self._unrecorded = [s for s in self._unrecorded if s != step]
    kept = max((s for s in self.manager.all_steps(read=True) if s != step
                and os.path.isdir(self.step_dir(s))), default=None)
    raise CheckpointWriteError(step, self.directory, disk.short_reason(error), kept) from None

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught  (an async save's error)
      self._raise_write_error(self._saving, e)
    self._record_finished()

  def close(self) -> None:
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-exception-caught
        if not self._failed:   # after a failed save the manager's own error is that one again
          raise
      finally:
        self._quiet.remove()

