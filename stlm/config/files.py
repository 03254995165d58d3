"""Experiment config files (configs/*.py) loaded by path, as main.py's --config loads them.

Drivers inside the package name a config file and take the folder as a flag, so they never
import the repository's `configs` package.
"""

import importlib.util
import os

import ml_collections

DEFAULT_DIR = 'configs'   # relative to where a command runs, like --config=configs/<name>.py


def load(path: str, arg: str = 'tiny') -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} not found (run from the repository root, or '
                            'pass the folder of the config files)')
  name = 'stlm_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
