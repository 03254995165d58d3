"""The package's import structure: no cycles, and imports point one way (docs/architecture.md).

Every import counts, including those inside functions, so a cycle cannot hide behind a
function-level import.
"""

import ast
import collections
import pathlib

from tests.conftest import REPO_ROOT

# Layers, lowest first: a module may import its own layer and those below, never above.
# The first matching prefix of a module's dotted name gives its layer.
LAYERS = (
    ('stlm.config.validate', 4),   # checks a whole config against the models' and optimizer's tables
    ('stlm.config.files', 1),
    ('stlm.config', 0),
    ('stlm.ids', 0),
    ('stlm.cli_errors', 0),   # every layer's bad-input errors derive from its BadInput
    ('kernels', 0),
    ('stlm.tokenizers', 1),
    ('stlm.data', 2),
    ('stlm.models', 3),
    ('stlm.export', 4),
    ('stlm.compress', 5),            # python -m stlm.compress writes exports
    ('stlm.generate', 5),
    ('stlm.eval', 6),
    ('stlm.train', 7),   # stlm.train.loop validates the config and runs final benchmarks
    ('stlm.train.optimizer', 3),
    ('stlm.classify', 9),
    ('stlm.report', 9),
    ('stlm.experiments', 10),
    ('stlm', 0),
)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(REPO_ROOT.glob('stlm/**/*.py')) + sorted(REPO_ROOT.glob('kernels/**/*.py')):
    parts = path.relative_to(REPO_ROOT).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    out[name] = path
  return out


def _resolve(name: str, modules) -> str | None:
  while name and name not in modules:
    name = name.rpartition('.')[0]
  return name or None


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports (top level or inside functions)."""
  modules = _modules()
  graph = collections.defaultdict(set)
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f'{node.module}.{a.name}' for a in node.names]
      for target in targets:
        if target.split('.')[0] == 'configs':
          graph[name].add('configs')
        resolved = _resolve(target, modules)
        if resolved and resolved != name:
          graph[name].add(resolved)
  return graph


def layer_of(module: str) -> int:
  matches = [(len(prefix), layer) for prefix, layer in LAYERS
             if module == prefix or module.startswith(prefix + '.')]
  assert matches, f'{module} has no layer in tests/test_layering.py LAYERS'
  return max(matches)[1]


def test_no_import_cycles():
  graph = import_graph()
  state, stack, cycles = {}, [], []

  def visit(v):
    state[v] = 'open'
    stack.append(v)
    for w in sorted(graph.get(v, ())):
      if state.get(w) == 'open':
        cycles.append(stack[stack.index(w):] + [w])
      elif w not in state:
        visit(w)
    stack.pop()
    state[v] = 'done'

  for v in sorted(graph):
    if v not in state:
      visit(v)
  assert not cycles, 'import cycles: ' + '; '.join(' -> '.join(c) for c in cycles)


def test_imports_point_down_and_never_into_configs():
  upward = []
  for module, targets in import_graph().items():
    for target in targets:
      if target == 'configs':
        upward.append(f'{module} imports the configs folder (load files with stlm.config.files)')
      elif layer_of(target) > layer_of(module):
        upward.append(f'{module} (layer {layer_of(module)}) imports {target} '
                      f'(layer {layer_of(target)})')
  assert not upward, '\n'.join(upward)


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path, monkeypatch):
  for rel, text in {'stlm/__init__.py': '', 'stlm/a.py': 'def f():\n  from stlm import b\n',
                    'stlm/b.py': 'from stlm import a\n'}.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text)
  monkeypatch.setattr(__import__(__name__, fromlist=['REPO_ROOT']), 'REPO_ROOT', tmp_path)
  assert import_graph() == {'stlm.a': {'stlm.b'}, 'stlm.b': {'stlm.a'}}
  try:
    test_no_import_cycles()
  except AssertionError as e:
    assert 'stlm.a -> stlm.b -> stlm.a' in str(e)
  else:
    raise AssertionError('the cycle was not found')
