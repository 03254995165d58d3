"""The config error type, low-level so model kinds can raise it from their own checks."""

from stlm import cli_errors


class ConfigError(cli_errors.BadInput, ValueError):
  """A config value that cannot work; the message names the key."""


def fail(key: str, value, why: str):
  """Raises ConfigError for `config.<key>=<value>`, saying why."""
  raise ConfigError(f'config.{key}={value!r}: {why}')
