"""Experiment configuration: the schema every config starts from, legacy values, errors.

`schema` holds the one table of defaults (`base_config`) and the size presets; `legacy`
what a key added later meant for configs written before it; `errors` the error every check
raises. `validate` (start-up checks) reads the choice tables of the modules whose behaviour
they name, so it sits above the models and the trainer and is imported as
`stlm.config.validate`, never from here; `legacy` likewise (it reads the schema).
"""

from stlm.config.errors import ConfigError
from stlm.config.schema import SIZE_PRESETS, apply_preset, base_config

__all__ = ['ConfigError', 'SIZE_PRESETS', 'apply_preset', 'base_config']
