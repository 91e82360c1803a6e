"""Print the packages whose installed version differs from requirements.lock (`make test-latest`).

Usage: python .ci/lock_diff.py requirements.lock"""

import sys
from importlib.metadata import distributions

from packaging.utils import canonicalize_name

locked = {}
for line in open(sys.argv[1], encoding="utf-8"):
    name, sep, version = line.split("#")[0].strip().partition("==")
    if sep:
        locked[canonicalize_name(name)] = version.strip()
installed = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
changed = sorted(n for n in locked.keys() & installed.keys() if locked[n] != installed[n])
print(f"{len(changed)} packages differ from {sys.argv[1]}:" if changed
      else f"the newest allowed versions are exactly {sys.argv[1]}")
for n in changed:
    print(f"  {n}: {locked[n]} (lock) -> {installed[n]} (newest allowed)")
for n in sorted(installed.keys() - locked.keys() - {"finetune-pipeline", "torch"}):
    print(f"  {n}: not in the lock -> {installed[n]}")
