"""``python -m tests.bench [NAME ...] [--tiny] [--out FILE]``.

Runs the named sub-benchmarks (all by default), prints a table and writes
the JSON results. ``--tiny`` runs every benchmark at a few domains and one
or two repeats, which checks that the benchmarks work, not how fast
balloonctl is. ``BENCH_SKIP_REAL=1`` skips the real-guest benchmark, which
is also skipped without root or without what the e2e tests need.
"""

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.bench import cost, isolation, reaction, real
from tests.bench.results import BenchResult, machine, render


@dataclasses.dataclass(frozen=True)
class Scale:
    reaction_sizes: list[int]
    reaction_starts: int
    reaction_repeats: int
    cost_cases: list[tuple[int, int]]
    cost_windows: int
    cost_window_s: float
    isolation_sizes: list[int]
    isolation_delay_s: float
    isolation_window_s: float
    isolation_repeats: int
    memory_sizes: list[int]
    memory_windows: int
    real_guests: int
    real_bursts: int
    real_period: int


FULL = Scale(
    reaction_sizes=[0, 100, 1000],
    reaction_starts=200,
    reaction_repeats=3,
    cost_cases=[(10, 1), (100, 1), (1000, 1), (2000, 1), (1000, 5)],
    cost_windows=5,
    cost_window_s=3.0,
    isolation_sizes=[100, 1000],
    isolation_delay_s=5.0,
    isolation_window_s=10.0,
    isolation_repeats=3,
    memory_sizes=[0, 1000, 2000],
    memory_windows=3,
    real_guests=2,
    real_bursts=3,
    real_period=2,
)

TINY = Scale(
    reaction_sizes=[0, 5],
    reaction_starts=5,
    reaction_repeats=2,
    cost_cases=[(5, 1)],
    cost_windows=2,
    cost_window_s=1.0,
    isolation_sizes=[5],
    isolation_delay_s=1.0,
    isolation_window_s=2.0,
    isolation_repeats=1,
    memory_sizes=[0, 5],
    memory_windows=1,
    real_guests=1,
    real_bursts=1,
    real_period=1,
)

Runner = Callable[[Scale], Awaitable[BenchResult]]


async def _reaction(scale: Scale) -> BenchResult:
    return await reaction.run(
        scale.reaction_sizes, scale.reaction_starts, scale.reaction_repeats
    )


async def _cost(scale: Scale) -> BenchResult:
    return cost.run_cost(scale.cost_cases, scale.cost_windows, scale.cost_window_s)


async def _isolation(scale: Scale) -> BenchResult:
    return await isolation.run(
        scale.isolation_sizes,
        scale.isolation_delay_s,
        scale.isolation_window_s,
        scale.isolation_repeats,
    )


async def _memory(scale: Scale) -> BenchResult:
    return cost.run_memory(scale.memory_sizes, scale.memory_windows)


# Set in the child process that runs the real-guest part.
REAL_INLINE = "BENCH_REAL_INLINE"


async def _real(scale: Scale) -> BenchResult:
    if os.environ.get(REAL_INLINE) == "1":
        return real.run(scale.real_guests, scale.real_bursts, scale.real_period)
    # The in-process parts register libvirt's event loop in this process,
    # and libvirt then enables keepalive on every new connection. The
    # harness's connection would sit in a loop that no longer runs, never
    # answer libvirtd's keepalive probes and be closed after about 30 s,
    # in the middle of the guests' convergence. A fresh process has no
    # event loop registered, so the real part runs in one.
    with tempfile.TemporaryDirectory(prefix="bench-real-") as scratch:
        out = Path(scratch) / "real.json"
        command = [sys.executable, "-m", "tests.bench", "real", "--out", str(out)]
        if scale is TINY:
            command.append("--tiny")
        child = await asyncio.create_subprocess_exec(
            *command,
            env={**os.environ, REAL_INLINE: "1"},
            stdout=asyncio.subprocess.DEVNULL,
        )
        await child.wait()
        if not out.exists():
            return BenchResult("real", error=f"child exited {child.returncode}")
        fields = json.loads(out.read_text())["benchmarks"]["real"]
    fields["load_before"] = tuple(fields["load_before"])
    if fields["load_after"] is not None:
        fields["load_after"] = tuple(fields["load_after"])
    return BenchResult(**fields)


BENCHMARKS: dict[str, Runner] = {
    "reaction": _reaction,
    "cost": _cost,
    "isolation": _isolation,
    "memory": _memory,
    "real": _real,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench")
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"sub-benchmarks to run: {', '.join(BENCHMARKS)} (default all)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a few domains, to check the benchmarks"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("BENCH_OUT", "bench-results.json")),
        help="JSON output file (default $BENCH_OUT or bench-results.json)",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        choices = ", ".join(BENCHMARKS)
        parser.error(f"unknown benchmark {', '.join(unknown)}: choose from {choices}")
    return args


async def run_all(
    names: list[str], scale: Scale, document: dict[str, Any], out: Path
) -> list[BenchResult]:
    """Run each benchmark; write the JSON after each, so a failure keeps the rest."""
    results = []
    document["benchmarks"] = {}
    for name in names:
        started = time.monotonic()
        print(f"bench: running {name}", file=sys.stderr, flush=True)
        try:
            result = await BENCHMARKS[name](scale)
        except Exception as exc:
            traceback.print_exc()
            result = BenchResult(name, error=f"{type(exc).__name__}: {exc}")
        result.seconds = time.monotonic() - started
        result.load_after = os.getloadavg()
        results.append(result)
        document["benchmarks"][name] = result.as_json()
        document["machine"]["load_at_end"] = os.getloadavg()
        write_document(out, document)
    return results


def write_document(out: Path, document: dict[str, Any]) -> None:
    out.write_text(json.dumps(document, indent=2) + "\n")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    names = args.names or list(BENCHMARKS)
    scale = TINY if args.tiny else FULL
    document: dict[str, Any] = {
        "machine": machine(),
        "command": "python -m tests.bench " + " ".join(argv),
        "scale": "tiny" if args.tiny else "full",
    }
    results = asyncio.run(run_all(names, scale, document, args.out))
    print(render(results))
    print(f"bench: results written to {args.out}", file=sys.stderr)
    failed = [result.name for result in results if result.error is not None]
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
