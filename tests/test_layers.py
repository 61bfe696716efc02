"""The house rules of jaxft/, checked on its source: no import from a lower layer to a higher
one, nor sideways between two packages of one layer (function-local imports included: they
cannot hide an edge); a stage imports no other stage and builds no mesh (the loop owns
meshes: `loop.train`, `loop.place`); no function longer than 80 lines."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / 'jaxft'

# Bottom to top: the real levels of the import graph. A module may import its own package
# and the layers below; two packages of one layer never import each other.
LAYERS = (
    ('jaxft.trees', 'jaxft.files', 'jaxft.compilation_cache', 'jaxft.partitioning'),
    ('jaxft.checkpointing', 'jaxft.distributed', 'jaxft.data', 'jaxft.measured'),
    ('jaxft.models',),
    ('jaxft.train', 'jaxft.workdir'),
    ('jaxft.objectives', 'jaxft.peft', 'jaxft.export', 'jaxft.generation'),
    ('jaxft.sources', 'jaxft.config'),
    ('jaxft.kinds',),
    ('jaxft.finetuning',),
    ('jaxft.distill',),
    ('jaxft.continual',),
    ('jaxft.stages',),
    ('jaxft.main',),
)
# Whole functions that read better in one piece (the note of the change says why).
LONG_OK: set[str] = set()


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PKG.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _layer(module: str) -> int | None:
  return (_package(module) or (None,))[0]


def _package(module: str) -> tuple[int, str] | None:
  """(layer, the package or module of LAYERS that holds `module`)."""
  for i, prefixes in enumerate(LAYERS):
    for p in prefixes:
      if module == p or module.startswith(p + '.'):
        return i, p
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


def _edges():
  """(path, line, module, (its layer, package), target, (the target's layer, package)) for
  every import from one package of LAYERS to another."""
  for path in _sources():
    module = _module_name(path)
    mine = _package(module)
    if mine is None:
      continue
    for line, target in _imports(ast.parse(path.read_text()), module):
      theirs = _package(target)
      if theirs is not None and theirs[1] != mine[1]:
        yield path.relative_to(PKG.parent), line, module, mine, target, theirs


def _bad_imports():
  """'file:line: what' for every import up a layer or sideways within one."""
  for path, line, module, mine, target, theirs in _edges():
    if theirs[0] > mine[0]:
      yield f'{path}:{line}: {module} (layer {mine[0]}) imports {target} (layer {theirs[0]})'
    elif theirs[0] == mine[0]:
      yield (f'{path}:{line}: {module} imports {target}, a package of its own layer '
             f'{mine[0]} (move one of them a layer down or up)')


def test_no_import_goes_up_a_layer_or_sideways():
  bad = list(_bad_imports())
  assert not bad, '\n'.join(bad)


def test_the_layer_table_is_tight():
  """Every package sits on the lowest layer its imports allow: a table with room to spare
  lets a module chain sideways unnoticed."""
  needed = {}
  for _, _, _, mine, _, theirs in _edges():
    needed[mine[1]] = max(needed.get(mine[1], 0), theirs[0] + 1)
  loose = [f'{p} is on layer {i} but needs only {needed.get(p, 0)}'
           for i, prefixes in enumerate(LAYERS) for p in prefixes
           if needed.get(p, 0) < i and p not in ('jaxft.main',)]
  assert not loose, '\n'.join(loose)


def _stage_sources():
  return sorted((PKG / 'stages').glob('*.py'))


def test_no_stage_imports_another_stage():
  bad = []
  for path in _stage_sources():
    module = _module_name(path)
    for line, target in _imports(ast.parse(path.read_text()), module):
      if target.startswith('jaxft.stages.') and module != 'jaxft.stages' and \
          target.split('.')[2] != module.split('.')[-1]:
        bad.append(f'{path.relative_to(PKG.parent)}:{line}: {module} imports {target}')
  assert not bad, '\n'.join(bad)


# What builds a mesh, places parameters on one or compiles a step: the loop's work.
MESH_WORK = ('build', 'make_mesh', 'param_shardings', 'device_put', 'make_eval_step',
             'make_train_step')


def test_no_stage_builds_a_mesh():
  bad = []
  for path in _stage_sources():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Call):
        name = getattr(node.func, 'attr', None) or getattr(node.func, 'id', None)
        if name in MESH_WORK:
          bad.append(f'{path.relative_to(PKG.parent)}:{node.lineno}: calls {name}')
  assert not bad, '\n'.join(bad)


def test_the_checker_sees_a_function_local_upward_import(tmp_path):
  src = 'def f():\n  from jaxft.stages import finetune\n  return finetune\n'
  found = list(_imports(ast.parse(src), 'jaxft.models.bert'))
  assert (2, 'jaxft.stages.finetune') in found or (2, 'jaxft.stages') in found
  assert all(_layer(t) == _layer('jaxft.stages') for _, t in found)


@pytest.mark.parametrize('limit, where', [(80, 'jaxft'), (65, 'jaxft/stages')])
def test_no_function_over_80_lines(limit, where):
  """80 lines anywhere; a stage is a thin job, and its functions stay under 65."""
  long = []
  for path in _sources():
    if not str(path).startswith(str(PKG.parent / where)):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        name = f'{_module_name(path)}.{node.name}'
        if n > limit and name not in LONG_OK:
          long.append(f'{path.relative_to(PKG.parent)}:{node.lineno}: {node.name} is {n} lines')
  assert not long, '\n'.join(long)
