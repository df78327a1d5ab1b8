import io
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from balloonctl.logs import (
    choose_format,
    configure_logging,
    get_logger,
    stop_log_writer,
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_is_json_off_a_terminal() -> None:
    assert choose_format("auto", io.StringIO()) == "json"


def test_auto_format_is_console_on_a_terminal() -> None:
    assert choose_format("auto", Terminal()) == "console"


def test_explicit_format_wins() -> None:
    assert choose_format("json", Terminal()) == "json"
    assert choose_format("console", io.StringIO()) == "console"


def test_structlog_event_is_one_json_line() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)

    get_logger(domain="web1", uuid="u-1").info("memory_released", target_kib=1024)

    (line,) = [json.loads(raw) for raw in stream.getvalue().splitlines()]
    assert line["event"] == "memory_released"
    assert line["level"] == "info"
    assert line["domain"] == "web1"
    assert line["uuid"] == "u-1"
    assert line["target_kib"] == 1024
    assert line["timestamp"].endswith("Z")


def test_stdlib_records_use_the_same_renderer() -> None:
    stream = io.StringIO()
    configure_logging("json", "debug", stream)

    logging.getLogger("libvirtaio").debug("add_handle(fd=%d)", 7)

    (line,) = [json.loads(raw) for raw in stream.getvalue().splitlines()]
    assert line["event"] == "add_handle(fd=7)"
    assert line["level"] == "debug"
    assert line["logger"] == "libvirtaio"
    assert "timestamp" in line


def test_level_filters_lower_levels() -> None:
    stream = io.StringIO()
    configure_logging("json", "warning", stream)

    get_logger().info("memory_kept")
    logging.getLogger("libvirt").info("ignored")
    get_logger().warning("stats_unavailable")

    events = [json.loads(raw)["event"] for raw in stream.getvalue().splitlines()]
    assert events == ["stats_unavailable"]


def test_console_format_is_not_json() -> None:
    stream = io.StringIO()
    configure_logging("console", "info", stream)

    structlog.stdlib.get_logger("balloonctl").info("domain_added", domain="web1")

    text = stream.getvalue()
    assert "domain_added" in text
    assert "domain=web1" in text
    assert not text.lstrip().startswith("{")


def test_threaded_writer_delivers_every_line() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream, threaded=True)

    for number in range(50):
        get_logger().info("memory_kept", number=number)
    stop_log_writer()

    numbers = [json.loads(raw)["number"] for raw in stream.getvalue().splitlines()]
    assert numbers == list(range(50))


def test_threaded_writer_does_not_block_on_stalled_reader() -> None:
    import threading

    release = threading.Event()

    class Stalled(io.StringIO):
        def write(self, text: str) -> int:
            release.wait(5)
            return super().write(text)

    stream = Stalled()
    configure_logging("json", "info", stream, threaded=True)
    started = time.monotonic()
    for number in range(100):
        get_logger().info("memory_kept", number=number)
    elapsed = time.monotonic() - started
    release.set()
    stop_log_writer()

    assert elapsed < 1.0
    assert len(stream.getvalue().splitlines()) == 100


def test_dropped_lines_are_counted_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    from balloonctl import logs

    release = threading.Event()

    class Stalled(io.StringIO):
        def write(self, text: str) -> int:
            release.wait(5)
            return super().write(text)

    monkeypatch.setattr(logs, "QUEUE_LINES", 5)
    stream = Stalled()
    configure_logging("json", "info", stream, threaded=True)
    for number in range(50):
        get_logger().info("memory_kept", number=number)
    release.set()
    stop_log_writer()

    written = len(stream.getvalue().splitlines())
    assert written < 50
    assert f"{50 - written} log lines were dropped" in capsys.readouterr().err


def test_closed_stdout_is_reported_once(tmp_path: Path) -> None:
    # `balloonctl run | head -1`: the reader exits after the first line.
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "balloonctl",
            "run",
            "--uri",
            "test:///default",
            "--stats-period",
            "1",
            "--log-format",
            "json",
            "--state-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        first = process.stdout.readline()
        process.stdout.close()
        # The test driver's domain is released once a second, so several
        # lines are written into the closed pipe meanwhile.
        time.sleep(4)
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read()

    assert json.loads(first)["event"]
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert stderr.count("cannot write log lines") == 1
