"""Bad input at a command line gives one line; a real bug keeps its traceback.

Every command (`main.py`, `python -m stlm.eval`, `stlm.generate`, `stlm.export`,
`stlm.classify`, `stlm.compress`, `stlm.report`, `stlm.eval.harness`, the experiment
commands) runs its main through `run` (or `one_line_errors`), which turns bad input into
`error: <message>` on stderr and exit code 1 (2 for a usage or flag-syntax error). `--verbosity=1` (`-v 1`) prints the
traceback above that line.

What counts as bad input is declared by the exception's type, never guessed from a message:
- a class deriving from `BadInput` (config, corpus, benchmark, classification-data and export
  errors; `FlagError` for a flag value that cannot work): its message names the key, flag or
  file;
- absl's `UsageError` and flag-parsing errors;
- the OSErrors of a path that cannot be used (missing, a directory where a file is expected
  or the reverse, no permission), which name the path.
Anything else (a TypeError in model code, an XLA error) is a bug and propagates unchanged.

Output paths are checked here before any expensive work (`check_output_file`,
`check_output_dir`) and written under a temporary name, then renamed (`atomic_file`,
`staged_dir`), so a failure never leaves a partial output behind.
"""

import contextlib
import os
import re
import shutil
import sys
import tempfile
import traceback

from absl import app
from absl import flags


class BadInput(Exception):
  """Mixin for errors that the user's input caused; the message says what and where."""


class FlagError(BadInput, ValueError):
  """A flag value that cannot work; the message names the flag."""


PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError)
USAGE_EXIT_CODE = 2
ERROR_EXIT_CODE = 1


def wants_traceback(argv=None) -> bool:
  """--verbosity/-v >= 1 asks for tracebacks even for bad input (read from argv, so it works
  before the flags are parsed, e.g. for a flag that fails to parse)."""
  argv = sys.argv if argv is None else argv
  for i, a in enumerate(argv):
    m = re.fullmatch(r'--?(?:verbosity|v)(?:=(-?\w+))?', a)
    if m:
      value = m.group(1) or (argv[i + 1] if i + 1 < len(argv) else '0')
      # lm_eval's own --verbosity takes a log level; DEBUG asks for details as 1 does.
      return value.upper() == 'DEBUG' or (value.lstrip('-').isdigit() and int(value) >= 1)
  return False


def is_bad_input(e: BaseException) -> bool:
  return isinstance(e, (BadInput, app.UsageError, flags.Error) + PATH_ERRORS)


def one_line(e: BaseException) -> str:
  """The message of `e` on one line (a multi-line message, e.g. a list of expected files, is
  joined), without the '[Errno 2]' noise of an OSError."""
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    text = f'{e.filename}: {e.strerror}'
  else:
    text = str(e) or type(e).__name__
  text = ' '.join(line.strip() for line in text.splitlines() if line.strip())
  return re.sub(r'^(error: )+', '', text)


def exit_with_one_line(e: BaseException, code: int | None = None, text: str | None = None):
  """Exits with `error: <text or e's message>`, after the traceback under --verbosity=1."""
  if wants_traceback():
    traceback.print_exception(e)
  if code is None:
    code = USAGE_EXIT_CODE if isinstance(e, (app.UsageError, flags.Error)) else ERROR_EXIT_CODE
  sys.stderr.write(f'error: {text if text is not None else one_line(e)}\n')
  sys.stderr.flush()
  sys.exit(code)


@contextlib.contextmanager
def one_line_errors(*also: type[BaseException]):
  """Bad input (and the types in `also`, e.g. a diverged run) raised inside exits in one line."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless bad input)
    if isinstance(e, also) or is_bad_input(e):
      exit_with_one_line(e)
    raise


def parse_flags(argv):
  """absl's flag parsing with a one-line error (absl's own prints two and a hint)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    exit_with_one_line(e)


def run(main, *also: type[BaseException], flags_parser=parse_flags) -> None:
  """`app.run(main)` where bad input in flag parsing or in main gives one line."""
  def main_with_one_line_errors(argv):
    with one_line_errors(*also):
      return main(argv)
  app.run(main_with_one_line_errors, flags_parser=flags_parser)


def config_flag_message(e: BaseException, argv=None) -> str:
  """One line for a --config / --config.<key> flag that failed (config_flags raises the
  innermost reason wrapped in other errors)."""
  argv = sys.argv if argv is None else argv
  text = str(e)
  # ml_collections reports a misspelled override as the repr of a KeyError with a hint.
  key = re.search(r"\\?'(\w+)\\?'", text)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  if isinstance(e, (AttributeError, KeyError)) and key:
    flag = next((a.split('=')[0] for a in argv[1:]
                 if a.startswith('--config.') and a.split('=')[0].endswith('.' + key.group(1))),
                f'--config...{key.group(1)}')
    return f'{flag}: the config has no key {flag[len("--config."):]!s}' + (
        f'; did you mean {hint.group(1)}?' if hint else '')
  # The innermost reason (e.g. a missing file, an unknown preset), without the stack.
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  reasons = [l for l in lines if re.match(r'(\w+Error|\[Errno \d+\])', l)]
  text = ' '.join(reasons[-1:] or lines[:1]) or type(e).__name__
  text = re.sub(r'^\w+Error: ', '', text)
  flag = next((a for a in argv[1:] if a.startswith('--config=')), None)
  if flag and flag.split('=', 1)[1] not in text:
    text = f'{flag}: {text}'
  return text


def exit_for_config_flag(e: BaseException):
  """Exits with one line for a --config flag that cannot work (a traceback with -v 1)."""
  exit_with_one_line(e, USAGE_EXIT_CODE, config_flag_message(e))


# ------------------------------------------------------------------ output paths

def _probe_write(flag: str, path: str, directory: str) -> None:
  try:   # a real write: permission bits do not tell (root, read-only mounts)
    os.rmdir(tempfile.mkdtemp(prefix='.stlm_probe_', dir=directory))
  except OSError as e:
    raise FlagError(f'{flag}={path}: cannot write in {directory} ({e.strerror})') from None


def check_output_file(flag: str, path: str) -> None:
  """Refuses an output file that could not be written, before any work is done."""
  if os.path.isdir(path):
    raise FlagError(f'{flag}={path} is a directory; give a file path')
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FlagError(f'{flag}={path}: the directory {directory} does not exist')
  _probe_write(flag, path, directory)


def check_output_dir(flag: str, path: str) -> None:
  """Refuses an output directory that is a file or could not be created or written; a
  missing one is fine when its nearest existing ancestor is a writable directory."""
  path = str(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise FlagError(f'{flag}={path} is a file, not a directory')
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise FlagError(f'{flag}={path}: {probe} is a file, not a directory')
  _probe_write(flag, path, probe)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_file(path: str, mode: str = 'w', encoding: str | None = 'utf-8'):
  """An open file that appears at `path` only once it is complete (temporary name, rename);
  on an error the temporary file is removed and any old file at `path` is kept."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.writing',
                             dir=directory)
  try:
    with os.fdopen(fd, mode, encoding=None if 'b' in mode else encoding) as f:
      yield f
    os.chmod(tmp, 0o666 & ~_umask())   # mkstemp's 0600 would hide the file from other readers
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def staged_dir(out_dir: str):
  """A fresh directory beside `out_dir` to write into; on success its files are renamed into
  `out_dir` (created if needed; files of other names there are kept), on an error it is
  removed and `out_dir` is left as it was."""
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.', suffix='.writing',
                             dir=parent)
  try:
    yield staging
    os.makedirs(out_dir, exist_ok=True)
    for name in sorted(os.listdir(staging)):
      target = os.path.join(out_dir, name)
      if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)   # a directory output (none yet) replaces the old one whole
      os.replace(os.path.join(staging, name), target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
