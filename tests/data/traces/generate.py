"""Write the shipped simulator traces into this directory.

Run ``.venv/bin/python tests/data/traces/generate.py`` to rebuild them. The
output is the same on every run: the daily trace's noise comes from a seeded
generator.
"""

import json
import math
import random
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent

Row = tuple[float, str, int, int]  # time s, guest, demand MiB, cache MiB


def write_csv(name: str, header: Iterable[str], rows: list[Row], cache: bool) -> None:
    lines = [*header, "time,guest,demand,cache" if cache else "time,guest,demand"]
    for time, guest, demand, cached in rows:
        fields = [f"{time:g}", guest, f"{demand} MiB"]
        if cache:
            fields.append(f"{cached} MiB")
        lines.append(",".join(fields))
    (HERE / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_jsonl(name: str, header: Iterable[str], rows: list[Row]) -> None:
    lines = list(header)
    for time, guest, demand, cached in rows:
        record = {
            "time": time,
            "guest": guest,
            "demand": f"{demand} MiB",
            "cache": f"{cached} MiB",
        }
        lines.append(json.dumps(record))
    (HERE / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def idle() -> None:
    rows: list[Row] = [(0, "idle", 250, 0), (1800, "idle", 250, 0)]
    header = [
        "# An idle guest: 250 MiB of demand for 30 minutes.",
        "# @maximum idle 2 GiB",
    ]
    write_csv("idle.csv", header, rows, cache=False)


def growth() -> None:
    rows: list[Row] = []
    for step in range(61):
        rows.append((step * 30, "app", 300 + 24 * step, 0))
    rows.append((2400, "app", 300 + 24 * 60, 0))
    header = [
        "# Steady growth: 300 MiB rising by 24 MiB every 30 s to 1740 MiB at",
        "# 30 minutes, then 10 minutes at that level.",
        "# @maximum app 2 GiB",
    ]
    write_csv("growth.csv", header, rows, cache=False)


def bursts() -> None:
    base = 500
    rows: list[Row] = [(0, "batch", base, 0)]
    for index in range(12):
        start = 60 + 300 * index
        if index % 2 == 0:
            rows.append((start, "batch", base + 300, 0))
        else:
            for offset, extra in ((0, 200), (5, 400), (10, 600)):
                rows.append((start + offset, "batch", base + extra, 0))
        rows.append((start + 40 if index % 2 else start + 30, "batch", base, 0))
    rows.append((3600, "batch", base, 0))
    header = [
        "# Bursts on a 500 MiB baseline, one every 5 minutes from minute 1:",
        "# even bursts add 300 MiB at once for 30 s; odd bursts are a job that",
        "# allocates 200 MiB every 5 s up to 600 MiB and exits after 40 s.",
        "# @maximum batch 2 GiB",
    ]
    write_csv("bursts.csv", header, rows, cache=False)


def daily() -> None:
    generator = random.Random(20240601)
    rows: list[Row] = []
    for step in range(24 * 12):
        hour = step / 12
        load = max(0.0, math.sin(math.pi * (hour - 6) / 16)) if 6 <= hour <= 22 else 0
        demand = 600 + int(1400 * load) + generator.randint(-40, 40)
        rows.append((step * 300, "web", demand, 0))
    rows.append((86400, "web", rows[-1][2], 0))
    header = [
        "# A full day of a web server, one row every 5 minutes: about 600 MiB",
        "# at night, rising from 06:00 to 2 GiB at 14:00 and falling back by",
        "# 22:00, with up to 40 MiB of noise either way.",
        "# @maximum web 4 GiB",
    ]
    write_csv("daily.csv", header, rows, cache=False)


def cache() -> None:
    rows: list[Row] = []
    for minute in range(61):
        cached = min(2560, minute * 85)
        demand = 700 + (1024 if 40 <= minute < 50 else 0)
        if minute == 40:
            # The job allocates its 1 GiB over the first minute, 5 s at a time.
            for step in range(12):
                ramp = 700 + 1024 * step // 12
                rows.append((minute * 60 + 5 * step, "files", ramp, cached))
            continue
        rows.append((minute * 60, "files", demand, cached))
    header = [
        "# A file server: 700 MiB of demand while its page cache grows by",
        "# 85 MiB a minute to 2.5 GiB; from minute 40 to 50 a job adds 1 GiB,",
        "# allocated over its first minute.",
        "# @maximum files 4 GiB",
    ]
    write_jsonl("cache.jsonl", header, rows)


def host() -> None:
    rows: list[Row] = [(0, "batch", 400, 0), (3600, "batch", 400, 0)]
    for minute in range(61):
        if minute < 10:
            web = 800
        elif minute < 30:
            web = 800 + 85 * (minute - 10)
        elif minute < 40:
            web = 2500
        else:
            web = max(1000, 2500 - 150 * (minute - 40))
        rows.append((minute * 60, "web", web, 0))
        rows.append((minute * 60, "idle", 250, 0))
    for index in range(6):
        start = 300 + 600 * index
        for step in range(8):
            rows.append((start + 5 * step, "batch", 400 + 150 * (step + 1), 0))
        rows.append((start + 220, "batch", 400, 0))
    rows.sort(key=lambda row: row[0])
    header = [
        "# Three guests whose maxima (10 GiB) exceed the host's 8 GiB. web",
        "# grows from 800 MiB to 2.5 GiB and back; batch runs a job every 10",
        "# minutes from minute 5 that allocates 150 MiB every 5 s up to 1.2 GiB",
        "# and exits after 220 s; idle stays at 250 MiB.",
        "# @host-memory 8 GiB",
        "# @maximum web 4 GiB",
        "# @maximum batch 4 GiB",
        "# @maximum idle 2 GiB",
    ]
    write_csv("host.csv", header, rows, cache=False)


if __name__ == "__main__":
    for build in (idle, growth, bursts, daily, cache, host):
        build()
