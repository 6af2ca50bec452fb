"""What machine this is, for benchmark and example reports."""

from __future__ import annotations

import os
import platform
from typing import Dict, Optional


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(torch: Optional[str] = None) -> Dict[str, object]:
    """What a measurement ran on: CPU, cores, optkern's ISA and threads, library versions
    (torch's as the caller found it: this module imports no optional package)."""
    import numpy as np

    import optkern as ok

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "isa": ok.active_isa(),
        "threads": ok.get_num_threads(),
        "optkern": ok.__version__,
        "numpy": np.__version__,
        "torch": torch,
        "python": platform.python_version(),
    }


def describe_machine() -> str:
    """One line for the header of a measured table."""
    info = machine()
    return f"{info['cpu']}, {info['cores']} logical cores, optkern ISA {info['isa']}"
