"""The house rules of jaxft/, checked on its source: no import from a lower layer to a higher
one (function-local imports included: they cannot hide an upward edge), and no function
longer than 80 lines."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / 'jaxft'

# Bottom to top. A module may import its own layer and the ones below.
LAYERS = (
    ('jaxft.trees', 'jaxft.partitioning', 'jaxft.checkpointing', 'jaxft.distributed',
     'jaxft.files', 'jaxft.compilation_cache'),
    ('jaxft.models', 'jaxft.data'),
    ('jaxft.train',),
    ('jaxft.objectives', 'jaxft.peft', 'jaxft.export', 'jaxft.sources', 'jaxft.workdir',
     'jaxft.distill', 'jaxft.finetuning', 'jaxft.generation', 'jaxft.continual'),
    ('jaxft.config',),
    ('jaxft.stages',),
    ('jaxft.main',),
)
# Whole functions that read better in one piece (the note of the change says why).
LONG_OK: set[str] = set()


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PKG.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _layer(module: str) -> int | None:
  for i, prefixes in enumerate(LAYERS):
    if any(module == p or module.startswith(p + '.') for p in prefixes):
      return i
  return None


def _imports(tree: ast.AST, module: str):
  """(line, imported name) for every import in the file, at any depth: `from a import b`
  gives 'a.b', whose layer is that of a.b if it is a module, else of a."""
  package = module.split('.')
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: resolved against this module's package
        base = '.'.join(package[:len(package) - node.level] + ([base] if base else []))
      for alias in node.names:
        yield node.lineno, f'{base}.{alias.name}'


def _sources():
  return sorted(p for p in PKG.rglob('*.py'))


def test_every_module_has_a_layer():
  missing = [_module_name(p) for p in _sources() if _layer(_module_name(p)) is None
             and _module_name(p) != 'jaxft']
  assert not missing, f'modules without a layer in tests/test_layers.py: {missing}'


def test_no_import_goes_up_a_layer():
  upward = []
  for path in _sources():
    module = _module_name(path)
    mine = _layer(module)
    if mine is None:
      continue
    for line, target in _imports(ast.parse(path.read_text()), module):
      theirs = _layer(target)
      if theirs is not None and theirs > mine:
        upward.append(f'{path.relative_to(PKG.parent)}:{line}: {module} (layer {mine}) imports '
                      f'{target} (layer {theirs})')
  assert not upward, '\n'.join(upward)


def test_the_checker_sees_a_function_local_upward_import(tmp_path):
  src = 'def f():\n  from jaxft.stages import finetune\n  return finetune\n'
  found = list(_imports(ast.parse(src), 'jaxft.models.bert'))
  assert (2, 'jaxft.stages.finetune') in found or (2, 'jaxft.stages') in found
  assert all(_layer(t) == _layer('jaxft.stages') for _, t in found)


@pytest.mark.parametrize('limit', [80])
def test_no_function_over_80_lines(limit):
  long = []
  for path in _sources():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        name = f'{_module_name(path)}.{node.name}'
        if n > limit and name not in LONG_OK:
          long.append(f'{path.relative_to(PKG.parent)}:{node.lineno}: {node.name} is {n} lines')
  assert not long, '\n'.join(long)
