"""Preemption: a SIGTERM/SIGINT (or JAX's preemption notice) ends the run cleanly at a step.

Cloud TPU, spot GPUs and SLURM announce a preemption with SIGTERM some seconds before the kill.
The first signal only sets a flag: the loop finishes the step it is in, saves a checkpoint,
waits for the async save and exits 0; the next start resumes there. A second signal restores
the default handler and re-sends itself, so the process dies at once (exit 143 / 130).

Multi-process runs must stop at the same step on every process, or the collective save would
hang. There jax.distributed's preemption service (on by default: it catches SIGTERM in its own
handler and agrees on a safe step across processes) answers through
`multihost_utils.reached_preemption_sync_point`, polled every step; no Python SIGTERM handler
is installed, so the service's own stays in place.
"""

import signal
import threading

import jax
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _preemption_service_active() -> bool:
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  state = distributed.global_state
  return state.client is not None and state.preemption_sync_manager is not None


class PreemptionWatcher:
  """Catches the first preemption signal; `stop_requested(step)` says when to save and exit.

  Use as a context manager around the training loop: the previous handlers come back on exit.
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    self._multi = jax.process_count() > 1
    self._service = self._multi and _preemption_service_active()

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be installed from the main thread
    signals = (signal.SIGINT,) if self._multi else _SIGNALS
    if self._multi and not self._service:
      signals = ()  # no agreement possible without the service: leave the defaults alone
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
    return False

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None:   # the second signal: abort now
      signal.signal(signum, signal.SIG_DFL)
      signal.raise_signal(signum)
      return
    self.signal_name = signal.Signals(signum).name

  def stop_requested(self, step: int) -> bool:
    """True when this step is the one to checkpoint and stop at (the same on every process)."""
    if self._service:
      # Poll every step, as the service requires; it syncs only after a notice arrived.
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or 'preemption notice'
        return True
      return False
    return self.signal_name is not None and not self._multi
