"""``python -m optkern bench``: optkern's step against the best NumPy code and torch's fastest
CPU optimizers, as a fraction of the machine's streaming bandwidth measured in the same run.
Then the benchmark of record: a NumPy MLP's training loop with NumPy updates, with optkern and
with optkern on one thread (study "loops", alone with --loops). Other studies run when named
(--studies). bench/README.md says what each measures; bench/results/ holds dated runs, each
naming its machine."""

from __future__ import annotations

import argparse
from typing import Dict

import optkern as ok

from .._cli import dims, positive_int, positive_seconds, size, thread_count, writable_file
from . import loops as _loops
from . import programs as _programs
from . import studies as _studies
from . import threads as _threads
from .cases import CASES, torch_available
from .runner import (
    Progress,
    machine,
    main_table,
    parse_size,
    run_clip,
    run_main,
    run_many_small,
    size_label,
    write_json,
    write_plot,
)

__all__ = ["CASES", "add_parser"]

DEFAULT_SIZES = ["100k", "1m", "10m", "50m"]
#: what ``python -m optkern bench`` runs by default (README, Set up)
STUDIES = ["main", "small", "threads", "clip", "loops"]
#: run only when named (optkern.benchmark.studies)
EXTRA_STUDIES = list(_studies.NAMES)
DEFAULT_REPEATS = 5


def _dims_or_none(text: str) -> str:
    """--loop-sizes: layer sizes, or none (the program shapes alone)."""
    return text if text == "none" else dims(text)


_dims_or_none.__name__ = dims.__name__  # argparse names the type in its message


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="time every optimizer against NumPy and torch", description=__doc__
    )
    p.add_argument(
        "--optimizers",
        nargs="+",
        default=list(CASES),
        choices=list(CASES),
        metavar="NAME",
        help=f"default all: {' '.join(CASES)}",
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        default=DEFAULT_SIZES,
        type=size,
        metavar="N",
        help="elements per parameter, e.g. 100k 1m 50m (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="threads for optkern and torch (default: optkern's default)",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help=f"timed batches per case (default {DEFAULT_REPEATS}; min is kept; --torch: medians, "
        "and its step cases repeat for about 0.5 s when that is more; the extra studies: "
        + ", ".join(f"{k} {v}" for k, v in _studies.DEFAULT_REPEATS.items())
        + ")",
    )
    p.add_argument(
        "--studies",
        nargs="+",
        default=STUDIES,
        choices=STUDIES + EXTRA_STUDIES,
        metavar="NAME",
        help="main: the table; small: 300 small buffers; threads: the update's median and p90 "
        "on default threads against one thread, quiet and beside busy processes; "
        "clip: fused clipping; loops: inside an MLP's training loop (default: these five); "
        "run only when named: threshold, thread-placement, adafactor-shapes, pass-bounds, "
        "torch-bandwidth, "
        "torch-phases (see optkern.benchmark.studies)",
    )
    p.add_argument(
        "--thread-sizes",
        nargs="+",
        default=[str(n) for n in _threads.DEFAULT_SIZES],
        type=size,
        metavar="N",
        help="elements of the threads study's one array (default: 10k to 10m)",
    )
    p.add_argument(
        "--thread-conditions",
        nargs="+",
        default=list(_threads.CONDITIONS),
        choices=list(_threads.CONDITIONS),
        help="threads study: quiet; busy1, busy3: one or three other processes spinning "
        "(default: all)",
    )
    p.add_argument(
        "--thread-seconds",
        type=positive_seconds,
        default=_threads.DEFAULT_SECONDS,
        metavar="S",
        help="threads study: seconds per optimizer and size (default %(default)s)",
    )
    p.add_argument(
        "--loops",
        action="store_true",
        help="only the training-loop study (shorthand for --studies loops)",
    )
    p.add_argument(
        "--loop-sizes",
        nargs="+",
        default=_loops.DEFAULT_LOOP_SIZES,
        type=_dims_or_none,
        metavar="DIMS",
        help="MLP layer sizes for the loops study, or none for the program shapes alone "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--programs",
        nargs="+",
        default=list(_programs.PROGRAMS),
        choices=list(_programs.PROGRAMS) + ["none"],
        metavar="NAME",
        help="program shapes run in the loops study beside the MLP, each with its own NumPy "
        f"update lines and with optkern: {' '.join(_programs.PROGRAMS)}, or none "
        "(default: all; see optkern/benchmark/programs.py)",
    )
    p.add_argument(
        "--loop-steps",
        type=positive_int,
        default=None,
        metavar="N",
        help="timed training steps per loop and round (default: about "
        f"{_loops.TARGET_SEGMENT_SECONDS * 1e3:.0f} ms of the NumPy loop, 2..200)",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=_loops.DEFAULT_ROUNDS,
        help="interleaved rounds of the loops study (median kept; default %(default)s)",
    )
    p.add_argument(
        "--loop-conditions",
        nargs="+",
        default=_loops.CONDITIONS,
        choices=_loops.CONDITIONS,
        help="quiet; busy: one other process spinning; torch: torch's pool warmed in "
        "the same process (default: all)",
    )
    p.add_argument("--no-torch", action="store_true", help="leave torch out even if installed")
    p.add_argument(
        "--torch",
        action="store_true",
        help="optkern.torch against torch.optim instead: the step at 1M and 50M "
        "and an autograd training loop, for SGD, Adam, AdamW, Adagrad, RMSprop and Adadelta "
        "unless --all or --optimizers says otherwise (see benchmark/torch_bench.py)",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="with --torch: every optkern.torch class, each against torch.optim's class or "
        "its reference package (lion-pytorch, optax, schedulefree) where installed",
    )
    p.add_argument(
        "--json", metavar="PATH", type=writable_file, help="write every measurement as JSON"
    )
    p.add_argument(
        "--plot",
        metavar="PATH",
        type=writable_file,
        help="PNG of time against size (needs matplotlib)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="under mpiexec: Adam over MPI ranks (DataParallel, ZeRO), default sizes "
        "10m 50m; see optkern.benchmark.distributed",
    )
    p.set_defaults(run=run, default_sizes=DEFAULT_SIZES)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        ok.set_num_threads(args.threads)
    repeats_given = args.repeats is not None
    if not repeats_given:
        args.repeats = DEFAULT_REPEATS
    if args.distributed:
        from .distributed import run_distributed

        return run_distributed(args)
    if args.torch:
        from .torch_bench import main_cli

        args.sizes_given = args.sizes != DEFAULT_SIZES
        args.optimizers_given = args.optimizers != list(CASES)
        return main_cli(args)
    use_torch = not args.no_torch and torch_available() is not None
    if use_torch:
        import torch

        torch.set_num_threads(ok.get_num_threads())
    sizes = [parse_size(s) for s in args.sizes]
    cases = [CASES[k] for k in args.optimizers]
    studies = {"loops"} if args.loops else set(args.studies)
    extra = [k for k in EXTRA_STUDIES if k in studies]
    if any(k in _studies.NEEDS_TORCH for k in extra) and torch_available() is None:
        raise SystemExit(
            "--studies torch-bandwidth / torch-phases need torch: pip install 'optkern[torch]'"
        )
    # the small study: Adam, or each optimizer --optimizers names
    small_keys = args.optimizers if args.optimizers != list(CASES) else ["adam"]
    if "loops" in studies:
        loop_sizes = [_loops.parse_dims(d) for d in args.loop_sizes if d != "none"]
        programs = [k for k in args.programs if k != "none"]
    total = (
        (len(sizes) * len(cases) if "main" in studies else 0)
        + (len(small_keys) if "small" in studies else 0)
        + (len(args.thread_conditions) if "threads" in studies else 0)
        + ("clip" in studies)
        + (len(args.loop_conditions) if "loops" in studies else 0)
        + len(extra)
    )
    progress = Progress(total, enabled=not args.quiet)
    info = machine()
    print(
        f"# {info['cpu']}, {info['cores']} cores; optkern {info['optkern']} ({info['isa']}, "
        f"{info['threads']} threads), numpy {info['numpy']}, "
        f"torch {info['torch'] if use_torch else '(not used)'}"
    )
    result: Dict[str, object] = {"machine": info}
    try:
        if "main" in studies:
            rows = run_main(cases, sizes, args.repeats, use_torch, progress)
            result["main"] = rows
        if "small" in studies:
            result["many_small"] = [
                run_many_small(args.repeats, use_torch, progress, key) for key in small_keys
            ]
        if "threads" in studies:
            optimizers = (
                args.optimizers if args.optimizers != list(CASES) else _threads.DEFAULT_OPTIMIZERS
            )
            result["threads"] = _threads.run_threads_study(
                optimizers,
                [parse_size(s) for s in args.thread_sizes],
                args.thread_conditions,
                args.thread_seconds,
                args.threads,
                progress,
                show_progress=not args.quiet,
            )
        if "clip" in studies:
            result["clip"] = run_clip(50_000_000, args.repeats, progress)
        if "loops" in studies:
            result["loops"] = _loops.run_loops(
                args.optimizers,
                loop_sizes,
                args.rounds,
                args.loop_steps,
                args.loop_conditions,
                args.threads,
                use_torch,
                progress,
                show_progress=not args.quiet,
                programs=programs,
            )
        for name in extra:
            progress(name)
            reps = args.repeats if repeats_given else _studies.DEFAULT_REPEATS[name]
            result.setdefault("studies", {})[name] = _studies.run_study(name, reps)
    finally:
        progress.close()
    report(result)
    if args.json:
        write_json(args.json, result)
        print(f"JSON written to {args.json}")
    if args.plot and "main" in result:
        written = write_plot(args.plot, result["main"])
        print(f"plot written to {written}" if written else "no plot: matplotlib is not installed")
    return 0


def report(result: Dict[str, object]) -> None:
    if "main" in result:
        print(
            "\nSeconds per step (min of repeats); GB/s and %bw: bytes moved per element "
            "(reads + writes, 4 bytes each) over the in-place streaming bandwidth (a += s*b) at that size; "
            "x: how many times faster optkern is."
        )
        print(main_table(result["main"]))
        streams: Dict[int, float] = {}
        for r in result["main"]:
            streams[r["size"]] = max(streams.get(r["size"], 0.0), r["stream_gbps"])
        print(
            "stream bandwidth (best beside any case): "
            + ", ".join(f"{size_label(n)} {g:.1f} GB/s" for n, g in streams.items())
        )
    for s in result.get("many_small", []):
        print(
            f"\n{s['optimizer']} over {s['buffers']} arrays of 64..64K elements "
            f"({s['elements']} in all):"
        )
        for name, t in s["seconds"].items():
            print(f"  {name:<32} {t * 1e6:9.1f} us")
        print(
            f"  overhead per buffer: {s['overhead_per_buffer_us']:.2f} us"
            + (
                f"; {s['speedup_vs_torch']:.2f}x faster than torch {s['torch_impl']}"
                if "speedup_vs_torch" in s
                else ""
            )
        )
    if "threads" in result:
        print("\nDefault threads against one thread (stragglers):")
        print(_threads.table(result["threads"]))
        print("targets:")
        print(_threads.target_lines(result["threads"]))
    if "clip" in result:
        c = result["clip"]
        print(
            f"\nAdam on {size_label(c['size'])} with clipping: "
            + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in c["seconds"].items())
            + f"; fused is {c['speedup']:.2f}x faster"
        )
    for study in result.get("studies", {}).values():
        print("\n" + study["text"])
    if "loops" in result:
        print("\nInside a training loop (NumPy MLP, batch 64, NumPy's default BLAS threads):")
        print(_loops.table(result["loops"]))
        if any(c.get("program_rows") for c in result["loops"]["conditions"]):
            print("\nProgram shapes (their own NumPy update lines against optkern):")
            print(_programs.table(result["loops"]["conditions"]))
        print("targets:")
        print(_loops.target_lines(result["loops"]))
