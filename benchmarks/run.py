"""`make bench`: run every benchmark script in this folder, one process each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = []
    for script in sorted(HERE.glob("*.py")):
        if script.name in ("run.py", "common.py"):
            continue
        print(f"== {script.name}", flush=True)  # noqa: T201
        if subprocess.call([sys.executable, str(script)] + sys.argv[1:], cwd=HERE) != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}")  # noqa: T201
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
