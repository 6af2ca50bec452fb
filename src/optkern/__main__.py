"""Command line: ``python -m optkern info``."""

from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def _info(_: argparse.Namespace) -> int:
    import optkern

    info = optkern.build_info()
    print(f"optkern {info['version']}")
    print(f"python {platform.python_version()} on {platform.machine()} ({platform.system()})")
    print(f"active ISA: {info['active_isa']}")
    print(f"available ISAs: {', '.join(info['available_isas'])}")
    print(f"threads: {info['num_threads']} (OpenMP {'on' if info['openmp'] else 'off'}; "
          f"one thread below {info['min_elements_per_thread']} elements per thread)")
    print(f"compiler: {info['compiler']}")
    print("kernel builds:")
    for isa, flags in info["isa_flags"].items():
        print(f"  {isa:<7} {flags}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, ISA, threads and build flags").set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
