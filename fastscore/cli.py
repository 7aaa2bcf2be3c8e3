"""The `fastscore` command line.

Every command has --help; bad arguments exit with status 2 and one line on stderr (no traceback);
a command that cannot do its job exits with status 1 and one line saying why.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
import sys


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---- fastscore info -------------------------------------------------------------------------------


def _info(args) -> int:
    import numpy
    import torch

    import fastscore

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"fastscore {fastscore.__version__}")
    versions = f"torch {torch.__version__}  triton {triton_version}  numpy {numpy.__version__}"
    print(f"python    {platform.python_version()}  {versions}")
    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)" if torch.version.cuda else "CPU build"
    print(
        f"torch     {cuda}; CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    )
    print("backends:")
    for name, info in fastscore.backends().items():
        where = ", ".join(info["devices"]) if info["available"] else "unavailable"
        reason = f"  ({info['reason']})" if info["reason"] else ""
        print(f"  {name:<7} {where}{reason}")
    return 0


# ---- fastscore bench ------------------------------------------------------------------------------


def bench_names() -> list[str]:
    """The benches shipped with the package: bench/bench_<name>.py."""
    import fastscore._bench as pkg

    return sorted(m.name[len("bench_") :] for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_"))


def _bench(args) -> int:
    import torch

    names = bench_names()
    wanted = names if args.what == "all" else [args.what]
    if args.what != "all" and args.what not in names:
        raise CommandError(f"no bench named {args.what!r}; choose from: {', '.join(names + ['all'])}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available")
    for name in wanted:
        module = importlib.import_module(f"fastscore._bench.bench_{name}")
        module.run(quick=args.quick, device=args.device, rounds=args.rounds, record=not args.no_record)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastscore", description="Fast layers, samplers and likelihoods for score-based models.")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("info", help="versions, build and available backends")
    p.set_defaults(func=_info)

    p = sub.add_parser(
        "bench",
        help="side-by-side timings: reference formulation, torch.compile of it, fastscore (ratios)",
        description="Checks that all providers agree, then times them interleaved in this process and prints "
        "medians and ratios; rows are appended to bench/results.csv (or ./fastscore-bench-results.csv).",
    )
    p.add_argument("what", nargs="?", default="all", help="a bench name (an op, or 'all'; default all)")
    p.add_argument("--quick", action="store_true", help="one representative case per bench, fewer rounds")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to run on (default cpu)")
    p.add_argument("--rounds", type=_positive_int, default=None, help="timed rounds per provider")
    p.add_argument("--no-record", action="store_true", help="do not append the results to the CSV history")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"fastscore {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastscore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
