"""Worker process of the training-loop benchmark: ``python -m optkern.benchmark._loops_worker
CONFIG.json`` runs one condition and writes its measurements back into CONFIG.json. Kept apart
from ``loops`` so that ``-m`` does not execute a module the package has already imported."""

import json
import sys

from optkern.benchmark.loops import run_worker


def main(path: str) -> int:
    with open(path) as f:
        cfg = json.load(f)
    result = run_worker(cfg)
    with open(path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
