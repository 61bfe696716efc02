"""The venv holds exactly the lock: every installed distribution (but jaxft and pip's own
tools) is in requirements/lock.txt at its version. A dependency added to pyproject.toml without
`bash .ci/upgrade-lock` would otherwise install at whatever version is newest that day."""
import re
import sys
from importlib import metadata

SKIP = {'jaxft', 'pip', 'setuptools', 'wheel'}


def canon(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def main(path: str) -> int:
  locked = {}
  for n, line in enumerate(open(path, encoding='utf-8'), 1):
    line = line.split('#', 1)[0].strip()
    if not line:
      continue
    name, sep, version = line.partition('==')
    if not sep:
      print(f'{path}:{n}: expected NAME==VERSION, got {line!r}', file=sys.stderr)
      return 2
    locked[canon(name)] = version.strip()
  bad = []
  for dist in metadata.distributions():
    name = canon(dist.metadata['Name'])
    if name in SKIP:
      continue
    if name not in locked:
      bad.append(f'{name} {dist.version} is installed but not in {path}')
    elif dist.version != locked[name]:
      bad.append(f'{name} {dist.version} is installed, {path} says {locked[name]}')
  for line in bad:
    print('error:', line, file=sys.stderr)
  if bad:
    print('run `bash .ci/upgrade-lock` to re-resolve and re-test', file=sys.stderr)
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1]))
