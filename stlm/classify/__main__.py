"""python -m stlm.classify --checkpoint=<export>|scratch --task=... --data_dir=... (see flags).

Prints accuracy ± standard error on the test split and writes the JSON record to --output.
Examples:
  python -m stlm.classify --checkpoint=runs/enc/export --task=agnews \\
      --data_dir=../shared/data/classification/agnews --output=agnews.json
  python -m stlm.classify --checkpoint=scratch --config=configs/encoder.py:bert1 \\
      --config.tokenizer.sp_model_path=runs/enc/export/tokenizer.model --task=agnews ...
  python -m stlm.classify --committee=runs/b1_s0/export,runs/b1_s1/export \\
      --reference=runs/b6/export --task=dbpedia --data_dir=...
"""

import json

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from stlm import cli_errors

config_flags.DEFINE_config_file('config', None, 'Config[:preset] of the model for '
                                '--checkpoint=scratch.', lock_config=False)
flags.DEFINE_string('checkpoint', None, 'Export directory (<workdir>/export), "scratch" '
                    '(with --config), or "scratch:<export>": that export\'s model and '
                    'tokenizer, untrained.')
flags.DEFINE_list('committee', [], 'Export directories fine-tuned separately whose class '
                  'probabilities are averaged (replaces --checkpoint).')
flags.DEFINE_string('reference', None, 'Export of one (deep) model fine-tuned alongside the '
                    'committee, for accuracy and latency per example.')
flags.DEFINE_enum('task', None, ['agnews', 'dbpedia', 'fewrel'], 'Task.')
flags.DEFINE_string('data_dir', '', 'Directory in the task\'s release layout.')
flags.DEFINE_string('train_file', '', 'Train file (default: the documented name in data_dir).')
flags.DEFINE_string('test_file', '', 'Test file (default: the documented name in data_dir; '
                    'AG News without test.csv: a test split carved from train).')
flags.DEFINE_enum('mode', 'finetune', ['finetune', 'probe'], 'Fine-tune everything, or train '
                  'a linear probe on the frozen backbone.')
flags.DEFINE_enum('pool', 'first', ['first', 'mean'], 'Pooling of a bidirectional backbone '
                  '(causal backbones always pool their last position).')
flags.DEFINE_string('output', '', 'JSON file for the result record.')
flags.DEFINE_integer('max_train', 0, 'Train examples (0 = all left after validation).')
flags.DEFINE_integer('val_size', 500, 'Validation examples carved from train.')
flags.DEFINE_integer('max_test', 0, 'Test examples (0 = all).')
flags.DEFINE_integer('carve_test', 2000, 'Test examples carved from train without a test file.')
flags.DEFINE_integer('max_steps', 600, 'Maximum training steps.')
flags.DEFINE_integer('batch_size', 32, 'Training batch size.')
flags.DEFINE_float('lr', 3e-4, 'Fine-tuning peak learning rate.')
flags.DEFINE_float('probe_lr', 1e-2, 'Linear-probe learning rate.')
flags.DEFINE_list('lr_grid', [], 'Learning rates to choose among on the validation split '
                  '(probe mode: probe learning rates); replaces --lr / --probe_lr.')
flags.DEFINE_list('pool_grid', [], 'Poolings to choose among on the validation split '
                  '(e.g. first,mean); replaces --pool.')
flags.DEFINE_integer('eval_every', 50, 'Steps between validation checks.')
flags.DEFINE_integer('patience', 4, 'Checks without improvement before stopping.')
flags.DEFINE_integer('seed', 0, 'Seed of splits, shuffling, head init and FewRel episodes.')
flags.DEFINE_list('fewrel_settings', ['5w1s', '10w5s'], 'FewRel N-way K-shot settings.')
flags.DEFINE_integer('episodes', 100, 'FewRel episodes per setting.')
flags.DEFINE_integer('queries', 5, 'FewRel queries per relation per episode.')
FLAGS = flags.FLAGS


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:   # a bad --config or --config.<key> reads as main.py's do
    cli_errors.exit_for_config_flag(e)


def _flag_of(spec: str) -> str:
  if spec == FLAGS.reference:
    return '--reference'
  return '--committee' if FLAGS.committee else '--checkpoint'


def _check_backbone(spec: str) -> None:
  """Refuses a backbone that cannot load or classify, without reading any params."""
  from stlm import export as export_lib  # pylint: disable=g-import-not-at-top
  from stlm.classify import backbone  # pylint: disable=g-import-not-at-top
  if spec.startswith('scratch:'):
    export_lib.check_export(spec[len('scratch:'):], f'{_flag_of(spec)}=scratch:')
  elif spec == 'scratch':
    if FLAGS.config is None:
      raise app.UsageError('--checkpoint=scratch needs --config=<file>[:preset]')
  else:
    backbone.check_backbone_export(spec, _flag_of(spec))


def _backbone(spec: str):
  from stlm.classify import backbone  # pylint: disable=g-import-not-at-top
  if spec.startswith('scratch:'):
    return backbone.scratch_like(spec[len('scratch:'):])
  if spec == 'scratch':
    return backbone.scratch_backbone(FLAGS.config)
  return backbone.load_backbone(spec, _flag_of(spec))


def _check_numbers() -> None:
  for name in ('max_steps', 'batch_size', 'val_size', 'eval_every', 'episodes', 'queries'):
    if FLAGS[name].value < 1:
      raise cli_errors.FlagError(f'--{name}={FLAGS[name].value} must be >= 1')
  for name in ('max_train', 'max_test', 'carve_test', 'patience'):
    if FLAGS[name].value < 0:
      raise cli_errors.FlagError(f'--{name}={FLAGS[name].value} must be >= 0')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  # pylint: disable=g-import-not-at-top
  from stlm.classify import finetune
  from stlm.classify import run
  specs = FLAGS.committee or ([FLAGS.checkpoint] if FLAGS.checkpoint else [])
  if not specs:
    raise app.UsageError('give --checkpoint=<export>|scratch or --committee=<e1>,<e2>,...')
  if FLAGS.task == 'fewrel' and len(specs) > 1:
    raise app.UsageError('FewRel episodes use one backbone (no committees)')
  # Every input is checked before a model is loaded or trained, so a mistake costs no wait.
  _check_numbers()
  if FLAGS.output:
    cli_errors.check_output_file('--output', FLAGS.output)
  split = run.SplitSettings(train_file=FLAGS.train_file, test_file=FLAGS.test_file,
                            val_size=FLAGS.val_size, max_train=FLAGS.max_train,
                            max_test=FLAGS.max_test, carve_test=FLAGS.carve_test,
                            seed=FLAGS.seed)
  if FLAGS.task == 'fewrel':
    run.fewrel_file(FLAGS.data_dir, FLAGS.test_file)
    run.fewrel_settings(FLAGS.fewrel_settings)
  else:
    run.task_files(FLAGS.task, FLAGS.data_dir, split)
  for spec in specs + ([FLAGS.reference] if FLAGS.reference else []):
    _check_backbone(spec)
  if FLAGS.task == 'fewrel':
    record = run.fewrel_task(_backbone(specs[0]), FLAGS.data_dir, FLAGS.test_file,
                             FLAGS.fewrel_settings, FLAGS.episodes, FLAGS.queries, FLAGS.seed)
  else:
    train = finetune.TrainSettings(mode=FLAGS.mode, pool=FLAGS.pool, lr=FLAGS.lr,
                                   probe_lr=FLAGS.probe_lr, batch_size=FLAGS.batch_size,
                                   max_steps=FLAGS.max_steps, eval_every=FLAGS.eval_every,
                                   patience=FLAGS.patience, seed=FLAGS.seed)
    grid = run.candidates(train, FLAGS.lr_grid, FLAGS.pool_grid)
    reference = _backbone(FLAGS.reference) if FLAGS.reference else None
    record = run.text_task([_backbone(s) for s in specs], FLAGS.task, FLAGS.data_dir, split,
                           grid, reference=reference)
  chosen = record.get('members', [{}])[0]
  if 'selection' in chosen:
    print(f'chosen on validation: pool={chosen["pool"]} lr={chosen["lr"]:g} '
          f'(validation accuracy {chosen["val_accuracy"]:.4f})')
  line = (f'{record["task"]} {record["mode"]}: accuracy {record["accuracy"]:.4f} ± '
          f'{record["stderr"]:.4f} (n_test={record["n_test"]})')
  if 'reference' in record:
    ref = record['reference']
    line += (f'; committee latency {record["committee"]["latency_s_per_example"] * 1e3:.3f} '
             f'ms/example vs reference {ref["accuracy"]:.4f} ± {ref["stderr"]:.4f}, '
             f'{ref["latency_s_per_example"] * 1e3:.3f} ms/example')
  print(line)
  if FLAGS.output:
    with cli_errors.atomic_file(FLAGS.output) as f:
      json.dump(record, f, indent=2)


if __name__ == '__main__':
  flags.mark_flag_as_required('task')
  cli_errors.run(main, flags_parser=_parse_flags)
