"""``balloonctl simulate``: replay traces through the policies and compare them.

Exit codes: 0 success, 1 failure to write the plot, 2 bad usage or an
invalid trace file. Run this module directly (``python -m
balloonctl.simulator.cli``) for the same command without the rest of the
balloonctl command line.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from balloonctl.simulator.engine import MAX_STEPS, Run, step_count
from balloonctl.simulator.metrics import Result, evaluate
from balloonctl.simulator.model import DEFAULT_MODEL
from balloonctl.simulator.policies import POLICIES, balloonctl_params
from balloonctl.simulator.report import render_json, render_table
from balloonctl.simulator.trace import Trace, TraceError, load_trace
from balloonctl.units import SizeError, parse_size

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_PERIOD_S = 5
HELP = "replay memory-demand traces through balloon policies and compare them"


def add_parser(
    subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> None:
    """Add the ``simulate`` subcommand to balloonctl's command line."""
    parser = subparsers.add_parser("simulate", help=HELP, description=HELP + ".")
    _add_arguments(parser)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "traces",
        nargs="+",
        type=Path,
        metavar="TRACE",
        help="trace file: CSV, or JSON lines if the name ends in .jsonl, "
        ".ndjson or .json",
    )
    parser.add_argument(
        "--policy",
        action="append",
        choices=list(POLICIES),
        metavar="NAME",
        help=f"policy to run; repeat for several (default all: {', '.join(POLICIES)})",
    )
    parser.add_argument(
        "--period",
        type=_period,
        default=DEFAULT_PERIOD_S,
        metavar="SECONDS",
        help="stats period and simulation step, in whole seconds "
        f"(default {DEFAULT_PERIOD_S})",
    )
    parser.add_argument(
        "--host-memory",
        type=_size,
        metavar="SIZE",
        help="host's total memory, such as '16 GiB'; overrides the trace's "
        "@host-memory (default twice the sum of the guests' maxima)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON with sizes in KiB (default: a table)",
    )
    parser.add_argument(
        "--plot",
        type=_png_path,
        metavar="FILE.png",
        help="draw allocation, target and demand over time to this PNG file; "
        "with several traces, one file per trace named FILE-TRACE.png "
        "(default: no plot)",
    )


def _period(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid period {text!r}: expected whole seconds, such as 5"
        ) from None
    if not 1 <= value <= 3600:
        raise argparse.ArgumentTypeError(
            f"invalid period {text!r}: expected whole seconds from 1 to 3600"
        )
    return value


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: must be greater than 0"
        )
    return size


def _png_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(
            f"invalid plot file {text!r}: the name must end in .png"
        )
    return path


def run(args: argparse.Namespace) -> int:
    """Run ``balloonctl simulate`` with parsed arguments and return the exit code."""
    try:
        traces = [_load(path, args.period) for path in args.traces]
    except TraceError as exc:
        _error(str(exc))
        return EXIT_USAGE

    policies = list(dict.fromkeys(args.policy or POLICIES))
    results: list[Result] = []
    runs_by_trace: list[tuple[Trace, list[Run]]] = []
    for trace in traces:
        trace_results, runs = evaluate(trace, policies, args.period, args.host_memory)
        results.extend(trace_results)
        runs_by_trace.append((trace, runs))

    if args.plot is not None:
        code = _plot(runs_by_trace, args.plot)
        if code != EXIT_OK:
            return code

    if args.json:
        buffer = balloonctl_params(args.period).min_unused
        print(render_json(results, args.period, DEFAULT_MODEL, buffer))
    else:
        print(render_table(results))
    return EXIT_OK


def _load(path: Path, period: int) -> Trace:
    trace = load_trace(path)
    steps = step_count(trace, period)
    if steps > MAX_STEPS:
        raise TraceError(
            str(path),
            None,
            f"the trace ends at {trace.end:g} s, which is {steps} steps of "
            f"{period} s; the limit is {MAX_STEPS} steps, so shorten the trace "
            "or use a longer --period",
        )
    return trace


def _plot(runs_by_trace: list[tuple[Trace, list[Run]]], path: Path) -> int:
    try:
        from balloonctl.simulator.plot import plot_runs
    except ImportError as exc:
        _error(
            f"--plot needs matplotlib, which failed to import ({exc}); "
            "install it with 'pip install matplotlib'"
        )
        return EXIT_FAILURE
    for trace, runs in runs_by_trace:
        target = path
        if len(runs_by_trace) > 1:
            target = path.with_name(f"{path.stem}-{trace.name}{path.suffix}")
        try:
            plot_runs(runs, target)
        except OSError as exc:
            _error(f"failed to write plot {str(target)!r}: {exc.strerror}")
            return EXIT_FAILURE
    return EXIT_OK


def _error(message: str) -> None:
    print(f"balloonctl simulate: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` as ``balloonctl simulate`` arguments and run the command."""
    parser = argparse.ArgumentParser(prog="balloonctl simulate", description=HELP)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
