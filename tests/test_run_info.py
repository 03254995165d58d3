"""run.json: docstring, git state, status through start / evaluation / crash / resume."""

import json
import os
import subprocess
import sys

import pytest

from stlm import config as config_lib
from stlm.train import run_info
from tests.conftest import REPO_ROOT


def test_config_docstring_is_read_without_running_the_file(tmp_path):
  doc = run_info.config_docstring(str(REPO_ROOT / 'configs' / 'learned_pe.py') + ':50m')
  assert doc.startswith('Table 2 row: a learned absolute position table')
  bad = tmp_path / 'bad.py'
  bad.write_text('raise SystemExit("never run")\n')
  assert run_info.config_docstring(str(bad)) == ''
  assert run_info.config_docstring(str(tmp_path / 'missing.py')) == ''


def test_git_state_outside_a_checkout_is_none(tmp_path):
  assert run_info.git_state(str(tmp_path)) == dict(commit=None, dirty=None)
  state = run_info.git_state(str(REPO_ROOT))
  if state['commit'] is not None:  # a git checkout (CI clones one)
    assert len(state['commit']) == 40 and isinstance(state['dirty'], bool)


def test_status_running_then_crashed_then_resumed(tmp_path):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  rec = run_info.RunRecorder(str(tmp_path), c, 'configs/baseline.py')
  rec.crashed(ValueError('before start'))  # nothing written before the workdir is ours
  assert not (tmp_path / 'run.json').exists()
  rec.start(c, dict(embedding=10, head=0, core=5, total=15, tied=True), 0)
  info = run_info.read(str(tmp_path))
  assert info['status'] == 'running' and info['params']['total'] == 15
  assert info['config'] == json.loads(json.dumps(c.to_dict())) and info['tokens_per_step'] == 8 * 128
  rec.first_step(1, 7.5)
  rec.evaluated(100, dict(loss=3.5, bits_per_byte=2.25), 1234.0)
  rec.crashed(FloatingPointError('loss became nan at step 101'))
  info = run_info.read(str(tmp_path))
  assert info['status'] == 'crashed' and 'FloatingPointError: loss became nan' in info['error']
  assert info['steps_done'] == 100 and info['tokens_seen'] == 100 * 1024
  assert info['final_validation'] == dict(step=100, loss=3.5, bits_per_byte=2.25)
  wall = info['wall_time_s']
  resumed = run_info.RunRecorder(str(tmp_path), c, 'configs/baseline.py')
  resumed.start(c, dict(total=15), 100)
  info = json.loads((tmp_path / 'run.json').read_text())
  assert info['status'] == 'running' and info['wall_time_s'] >= wall
  resumed.first_step(101, 4.25)   # each start adds its time to first step; none is lost
  assert run_info.read(str(tmp_path))['starts'] == [dict(step=1, time_to_first_step_s=7.5),
                                                    dict(step=101, time_to_first_step_s=4.25)]
  resumed.finished()
  assert run_info.read(str(tmp_path))['status'] == 'finished'


@pytest.mark.slow
def test_metrics_writer_starts_without_importing_torch(tmp_path):
  # tensorboardX pulls in torch (seconds of start-up) when it is installed; the writer must
  # not, and a later `import torch` in the same process must still work.
  code = f'''
import sys
from stlm.train import metrics
w = metrics.MetricsWriter({str(tmp_path)!r}, 3, 0)
w.write(1, 'train', dict(loss=1.5))
w.close()
assert 'torch' not in sys.modules, 'torch was imported'
assert 0 < metrics.seconds_since_process_start() < 600
try:
  import torch
except ImportError:
  pass   # not installed: nothing to check
else:
  assert torch.ones(2).sum().item() == 2.0
print('ok')
'''
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-2000:]
  assert '"loss": 1.5' in (tmp_path / 'metrics.jsonl').read_text()
