"""Check that every ``name==version`` pinned in a constraints file is still what is installed.

Used by ``make test-lowest``: a user's stack is installed first, then ``pip install .``; pellucid
must fit around it, never replace it. Exit status 1 with one line per changed package otherwise.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def pinned(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, want = (part.strip() for part in line.split("==", 1))
            pins[name] = want
    return pins


def main(path: str) -> int:
    changed = []
    for name, want in pinned(Path(path)).items():
        try:
            have = version(name)
        except PackageNotFoundError:
            have = "missing"
        if have.split("+")[0] != want.split("+")[0]:
            changed.append(f"{name}: installed first as {want}, now {have}")
        else:
            print(f"kept {name} {have}")
    for line in changed:
        print(f"error: pip install . changed the user's stack: {line}", file=sys.stderr)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
