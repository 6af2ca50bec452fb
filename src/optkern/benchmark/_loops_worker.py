"""Worker process of the training-loop and thread studies: ``python -m
optkern.benchmark._loops_worker CONFIG.json`` runs one condition (of the study CONFIG names,
"loops" unless it says "threads") and writes its measurements back into CONFIG.json. Kept apart
from ``loops`` so that ``-m`` does not execute a module the package has already imported."""

import json
import sys


def main(path: str) -> int:
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("study") == "threads":
        from optkern.benchmark.threads import run_worker
    else:
        from optkern.benchmark.loops import run_worker
    result = run_worker(cfg)
    with open(path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
