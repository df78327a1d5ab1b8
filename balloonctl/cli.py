"""Command line: ``balloonctl run``, ``plan``, ``check-config`` and ``simulate``.

Exit codes: 0 success, 1 runtime failure (such as an unreachable URI),
2 bad usage or configuration.
"""

import argparse
import asyncio
import faulthandler
import json
import os
import signal
import stat
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
    insecure_reason,
)
from balloonctl.controller import ConnectFailed
from balloonctl.errors import HypervisorError
from balloonctl.hypervisor import HostMemory
from balloonctl.libvirt_adapter import LibvirtHypervisor, silence_libvirt_stderr
from balloonctl.lock import LockFailed, LockHeld
from balloonctl.logs import configure_logging, stop_log_writer
from balloonctl.metrics_server import MetricsExporter, MetricsListenError
from balloonctl.notify import Notifier
from balloonctl.plan import PlanRow, make_plan, render_json, render_table
from balloonctl.service import Supervisor, load_settings
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
    "metrics_listen",
)


def _add_threshold_options(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument(
        "--uri",
        action="append",
        help="libvirt connection URI of a hypervisor to manage; give it once "
        "per hypervisor, and it replaces the config file's uri and uris "
        f"(default {defaults.uri})",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML config file; flags given on the command line override it "
        "(default: none, only flags and built-in defaults)",
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
        help="directory of run's lock file and of the status file plan reads, "
        f"one of each per URI (default {defaults.state_dir})",
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
            help=f"{text}; shell-style, may be repeated (default: no pattern, "
            "so every domain is a candidate)",
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

    run = commands.add_parser(
        "run",
        help="manage the guests until SIGTERM or SIGINT; SIGHUP reloads --config",
        description="Manage the guests of every --uri until SIGTERM or SIGINT. "
        "SIGHUP reads the --config file again; flags keep precedence over it.",
    )
    _add_threshold_options(run)
    run.add_argument(
        "--dry-run",
        action="store_const",
        const=True,
        help="decide and log, but change nothing on any domain; the "
        "connections are read-only and no lock is taken (default: off)",
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
    run.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; :PORT or "
        "PORT alone listens on 127.0.0.1, an IPv6 address goes in brackets "
        "(default: no metrics, no listening socket)",
    )

    plan = commands.add_parser(
        "plan",
        help="show what the controller would do now, changing nothing",
        description="Read every running domain once over a read-only "
        "connection and print its status and the decision the controller "
        "would make now. Nothing is changed.",
    )
    _add_threshold_options(plan)
    plan.add_argument(
        "--json",
        action="store_true",
        help="print JSON with sizes in KiB (default: a table)",
    )
    check = commands.add_parser(
        "check-config",
        help="validate a config file and exit 0, or 2 with the error run would give",
        description="Validate a TOML config file as `run --config FILE` "
        "would read it. Exits 0 when it is valid, or 2 with the error.",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="TOML config file")
    simulator_cli.add_parser(commands)
    return parser


def setting_flags(args: argparse.Namespace) -> dict[str, object]:
    """Return the settings given as flags, as raw strings, by config key."""
    flags: dict[str, object] = {key: getattr(args, key, None) for key in _SETTING_FLAGS}
    uris = flags.pop("uri")
    if isinstance(uris, list) and len(uris) > 1:
        flags["uris"] = uris
    elif isinstance(uris, list):
        flags["uri"] = uris[0]
    return flags


def _error(message: str) -> None:
    print(f"balloonctl: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        return simulator_cli.run(args)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "run":
        _keep_early_signals()
    flags = setting_flags(args)
    try:
        settings = load_settings(args.config, flags)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE

    if args.command == "plan":
        configure_logging("console", "warning", sys.stderr)
        silence_libvirt_stderr()
        _warn_if_insecure(args.config)
        return asyncio.run(_plan(settings, args.json))

    configure_logging(settings.log_format, settings.log_level, threaded=True)
    silence_libvirt_stderr()
    _warn_if_insecure(args.config)
    exporter = MetricsExporter(settings.metrics_listen)
    try:
        return _run(
            Supervisor(
                settings,
                config=args.config,
                flags=flags,
                notifier=Notifier.from_environment(),
                host_metrics=exporter.host,
            ),
            exporter,
        )
    finally:
        stop_log_writer()


def _warn_if_insecure(config: Path | None) -> None:
    """Log config_insecure when other users could change the config file.

    This is a warning and not a refusal: the file was already readable to
    them, and a service that stops at boot over a mode is worse for most
    operators than one that says so in every start-up log.
    """
    if config is None:
        return
    reason = insecure_reason(config)
    if reason is None:
        return
    mode = stat.S_IMODE(config.stat().st_mode)
    structlog.stdlib.get_logger("balloonctl").warning(
        "config_insecure",
        path=str(config),
        mode=f"{mode:04o}",
        owner_uid=config.stat().st_uid,
        reason=f"{reason}; make it writable by its owner only (chmod go-w) and "
        "owned by root or the user balloonctl runs as",
    )


def _check_config(path: Path) -> int:
    try:
        settings = load_settings(path, {})
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    hosts = ", ".join(settings.hosts)
    print(f"{path}: OK (manages {hosts})")
    return EXIT_OK


_early_signals: list[int] = []


def _record_early_signal(signum: int, _frame: object) -> None:
    _early_signals.append(signum)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _keep_early_signals() -> None:
    """Keep SIGTERM and SIGINT that arrive before the event loop runs.

    Called as soon as the parsed command is ``run``, before the settings
    are read: a stop signal in that window ends the run with exit 0 once
    the loop starts, instead of killing the process. SIGHUP would end the
    process by default, so until the loop handles it (a reload) it is
    ignored. Signals during the imports, before ``main`` runs, still get
    Python's default handling.
    """
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _record_early_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _run(supervisor: Supervisor, exporter: MetricsExporter) -> int:
    # `kill -USR1 PID` writes every thread's stack to stderr, which shows
    # where a process that stopped logging is waiting.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    log = structlog.stdlib.get_logger("balloonctl")
    try:
        supervisor.take_locks()
    except (LockHeld, LockFailed) as exc:
        log.error("controller_failed", uri=getattr(exc, "uri", None), error=str(exc))
        _error(str(exc))
        return EXIT_FAILURE
    try:
        code = asyncio.run(_serve(supervisor, exporter))
    finally:
        for hypervisor in supervisor.hypervisors:
            hypervisor.shutdown_threads()
        # The shutdown already runs; a repeated signal must not kill it.
        for signum in (*_STOP_SIGNALS, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)

    busy = sum(hypervisor.busy_calls() for hypervisor in supervisor.hypervisors)
    if busy:
        # A thread stuck in libvirt cannot be interrupted, and the interpreter
        # would wait for it at exit. Balloon targets stay where they are.
        log.warning("exit_with_calls_in_flight", calls=busy)
        stop_log_writer()
        sys.stdout.flush()
        # The kernel releases the locks as the process ends.
        os._exit(code)
    supervisor.release_locks()
    return code


async def _serve(supervisor: Supervisor, exporter: MetricsExporter) -> int:
    loop = asyncio.get_running_loop()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, supervisor.stop.set)
    loop.add_signal_handler(signal.SIGHUP, supervisor.request_reload)
    if _early_signals:
        supervisor.stop.set()

    try:
        exporter.start()
    except MetricsListenError as exc:
        _metrics_failed(exc)
        return EXIT_FAILURE
    try:
        await supervisor.run()
    except ConnectFailed as exc:
        uris = ", ".join(repr(uri) for uri in supervisor.settings.hosts)
        structlog.stdlib.get_logger("balloonctl").error(
            "controller_failed", uri=supervisor.settings.uri, error=str(exc)
        )
        _error(f"cannot connect to {uris}: {exc}")
        return EXIT_FAILURE
    finally:
        await exporter.stop()
    return EXIT_OK


def _metrics_failed(exc: MetricsListenError) -> None:
    structlog.stdlib.get_logger("balloonctl").error(
        "metrics_listen_failed", address=str(exc.address), error=str(exc.error)
    )
    _error(
        f"cannot listen for metrics on {exc}; choose another address with "
        "--metrics-listen or metrics_listen in the config file"
    )


async def _plan(settings: Settings, as_json: bool) -> int:
    hosts = settings.hosts
    reports = [await _plan_host(settings.for_host(uri)) for uri in hosts]
    code = EXIT_OK
    texts = []
    documents = []
    for uri, report in zip(hosts, reports, strict=True):
        if isinstance(report, HypervisorError):
            _error(f"cannot read {uri!r}: {report}")
            code = EXIT_FAILURE
            documents.append({"uri": uri, "error": str(report)})
            texts.append(f"uri: {uri}\nerror: {report}")
            continue
        rows, host = report
        host_settings = settings.for_host(uri)
        documents.append(json.loads(render_json(rows, host, host_settings)))
        table = render_table(rows, host, host_settings)
        texts.append(f"uri: {uri}\n{table}" if len(hosts) > 1 else table)
    if len(hosts) == 1 and code != EXIT_OK:
        return code  # one host: the error alone, as before
    if as_json:
        output = json.dumps(
            documents[0] if len(hosts) == 1 else {"hosts": documents}, indent=2
        )
    else:
        output = "\n\n".join(texts)
    try:
        print(output, flush=True)
    except BrokenPipeError:
        # The reader (``plan | head``) went away, which is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


async def _plan_host(
    settings: Settings,
) -> tuple[list[PlanRow], HostMemory | None] | HypervisorError:
    hypervisor = LibvirtHypervisor(
        settings.uri, call_timeout=settings.call_timeout, read_only=True
    )
    try:
        await hypervisor.connect(None)
        return await make_plan(hypervisor, settings)
    except HypervisorError as exc:
        return exc
    finally:
        await hypervisor.close()
        hypervisor.shutdown_threads()
