"""Command line: ``balloonctl run`` and ``balloonctl plan``.

Exit codes: 0 success, 1 runtime failure (such as an unreachable URI),
2 bad usage or configuration.
"""

import argparse
import asyncio
import faulthandler
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from balloonctl import __version__
from balloonctl.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    Settings,
    build_settings,
    load_file,
)
from balloonctl.controller import ConnectFailed, Controller
from balloonctl.errors import HypervisorError
from balloonctl.libvirt_adapter import LibvirtHypervisor, silence_libvirt_stderr
from balloonctl.logs import configure_logging, stop_log_writer
from balloonctl.plan import make_plan, render_json, render_table
from balloonctl.simulator import cli as simulator_cli
from balloonctl.units import format_size

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_SETTING_FLAGS = (
    "uri",
    "stats_period",
    "min_unused",
    "max_release",
    "min_release",
    "host_warn",
    "call_timeout",
    "dry_run",
    "log_format",
    "log_level",
    "grow_margin",
    "floor_min",
    "floor_percent",
    "host_reserve",
    "release_cooldown",
    "stuck_periods",
    "manual_grace",
    "distress_major_faults",
    "metric",
    "include",
    "exclude",
    "state_dir",
)


def _add_threshold_options(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument(
        "--uri", help=f"libvirt connection URI (default {defaults.uri})"
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML config file; flags given on the command line override it",
    )
    parser.add_argument(
        "--stats-period",
        metavar="SECONDS",
        help="how often guests report memory statistics and are sampled, "
        f"in whole seconds (default {defaults.stats_period})",
    )
    sizes = {
        "--min-unused": ("unused memory to keep in each guest", defaults.min_unused),
        "--max-release": ("largest release in one step", defaults.max_release),
        "--min-release": ("smaller releases are skipped", defaults.min_release),
        "--host-warn": (
            "warn when the host's available memory is at or below this",
            defaults.host_warn,
        ),
        "--grow-margin": (
            "memory granted beyond the buffer when a guest runs short",
            defaults.grow_margin,
        ),
        "--floor-min": ("no guest is shrunk below this", defaults.floor_min),
    }
    for flag, (text, default) in sizes.items():
        parser.add_argument(
            flag,
            metavar="SIZE",
            help=f"{text}; a size with a unit: KiB, MiB, GiB or TiB "
            f"(default {format_size(default)})",
        )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="directory where run records each domain's status for plan "
        f"(default {defaults.state_dir})",
    )
    parser.add_argument(
        "--call-timeout",
        metavar="SECONDS",
        help="how long one libvirt call may take before it counts as failed "
        f"(default {defaults.call_timeout:g})",
    )
    _add_policy_options(parser, defaults)


def _add_policy_options(parser: argparse.ArgumentParser, defaults: Settings) -> None:
    parser.add_argument(
        "--floor-percent",
        metavar="PERCENT",
        help="no guest is shrunk below this percentage of its maximum memory "
        f"(default {defaults.floor_percent:g})",
    )
    parser.add_argument(
        "--host-reserve",
        metavar="SIZE",
        help="grants never take the host's available memory below this, "
        "except emergencies (default: the --host-warn value)",
    )
    parser.add_argument(
        "--metric",
        choices=("unused", "usable"),
        help="guest figure that counts as free: unused (MemFree) or usable "
        f"(MemAvailable, counts page cache) (default {defaults.metric})",
    )
    counts = {
        "--release-cooldown": (
            "PERIODS",
            "periods after a grant with no release",
            defaults.release_cooldown,
        ),
        "--stuck-periods": (
            "PERIODS",
            "periods without balloon progress before a target counts as stuck",
            defaults.stuck_periods,
        ),
        "--manual-grace": (
            "SECONDS",
            "seconds without release after a balloon change balloonctl did not make",
            defaults.manual_grace,
        ),
        "--distress-major-faults": (
            "COUNT",
            "major faults between two reports that count as guest distress",
            defaults.distress_major_faults,
        ),
    }
    for flag, (metavar, text, default) in counts.items():
        parser.add_argument(flag, metavar=metavar, help=f"{text} (default {default:g})")
    for flag, text in (
        ("--include", "manage only domains whose name matches PATTERN"),
        ("--exclude", "never manage domains whose name matches PATTERN"),
    ):
        parser.add_argument(
            flag,
            metavar="PATTERN",
            action="append",
            help=f"{text}; shell-style, may be repeated",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balloonctl",
        description="Keep each libvirt guest's unused memory near a buffer "
        "by moving its virtio balloon.",
    )
    parser.add_argument(
        "--version", action="version", version=f"balloonctl {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the controller until SIGTERM or SIGINT")
    _add_threshold_options(run)
    run.add_argument(
        "--dry-run",
        action="store_const",
        const=True,
        help="decide and log, but change nothing on any domain",
    )
    run.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="log line format; auto means console on a terminal and JSON "
        "otherwise (default auto)",
    )
    run.add_argument(
        "--log-level", choices=LOG_LEVELS, help="lowest level logged (default info)"
    )

    plan = commands.add_parser(
        "plan", help="show what the controller would do now, changing nothing"
    )
    _add_threshold_options(plan)
    plan.add_argument(
        "--json", action="store_true", help="print JSON with sizes in KiB"
    )
    simulator_cli.add_parser(commands)
    return parser


def load_settings(args: argparse.Namespace) -> Settings:
    file_values = load_file(args.config) if args.config is not None else {}
    flags = {key: getattr(args, key, None) for key in _SETTING_FLAGS}
    return build_settings(file_values, flags)


def _error(message: str) -> None:
    print(f"balloonctl: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        return simulator_cli.run(args)
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE

    if args.command == "plan":
        configure_logging("console", "warning", sys.stderr)
        silence_libvirt_stderr()
        return asyncio.run(_plan(settings, args.json))

    configure_logging(settings.log_format, settings.log_level, threaded=True)
    silence_libvirt_stderr()
    try:
        return _run(settings)
    finally:
        stop_log_writer()


_early_signals: list[int] = []


def _record_early_signal(signum: int, _frame: object) -> None:
    _early_signals.append(signum)


def _run(settings: Settings) -> int:
    # `kill -USR1 PID` writes every thread's stack to stderr, which shows
    # where a process that stopped logging is waiting.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # A signal that arrives before the event loop runs is kept, not lost.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _record_early_signal)
    hypervisor = LibvirtHypervisor(settings.uri, call_timeout=settings.call_timeout)
    try:
        code = asyncio.run(_serve(hypervisor, settings))
    finally:
        hypervisor.shutdown_threads()
        # The shutdown already runs; a repeated signal must not kill it.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)

    if hypervisor.busy_calls():
        # A thread stuck in libvirt cannot be interrupted, and the interpreter
        # would wait for it at exit. Balloon targets stay where they are.
        structlog.stdlib.get_logger("balloonctl").warning(
            "exit_with_calls_in_flight", calls=hypervisor.busy_calls()
        )
        stop_log_writer()
        sys.stdout.flush()
        os._exit(code)
    return code


async def _serve(hypervisor: LibvirtHypervisor, settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _ignore_sighup)
    if _early_signals:
        stop.set()

    controller = Controller(hypervisor, settings)
    try:
        await controller.run(stop)
    except ConnectFailed as exc:
        structlog.stdlib.get_logger("balloonctl").error(
            "controller_failed", uri=settings.uri, error=str(exc)
        )
        _error(f"cannot connect to {settings.uri!r}: {exc}")
        return EXIT_FAILURE
    return EXIT_OK


def _ignore_sighup() -> None:
    structlog.stdlib.get_logger("balloonctl").warning(
        "signal_ignored",
        signal="SIGHUP",
        reason="configuration reload is not supported; restart to apply a change",
    )


async def _plan(settings: Settings, as_json: bool) -> int:
    hypervisor = LibvirtHypervisor(
        settings.uri, call_timeout=settings.call_timeout, read_only=True
    )
    try:
        await hypervisor.connect(None)
        rows, host = await make_plan(hypervisor, settings)
    except HypervisorError as exc:
        _error(f"cannot read {settings.uri!r}: {exc}")
        return EXIT_FAILURE
    finally:
        await hypervisor.close()
        hypervisor.shutdown_threads()

    render = render_json if as_json else render_table
    try:
        print(render(rows, host, settings), flush=True)
    except BrokenPipeError:
        # The reader (``plan | head``) went away, which is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK
