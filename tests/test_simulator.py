"""The trace simulator: trace parsing, guest model, policies, command line, target."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from balloonctl.simulator.engine import simulate
from balloonctl.simulator.hostpolicies import (
    MomPolicy,
    ProxmoxPolicy,
    VmStatus,
    compute_balloons,
)
from balloonctl.simulator.metrics import Result, evaluate
from balloonctl.simulator.model import Guest, GuestStats, ModelParams
from balloonctl.simulator.policies import (
    POLICIES,
    BalloonctlPolicy,
    OraclePolicy,
    SeedPolicy,
    balloonctl_params,
    required_allocation,
)
from balloonctl.simulator.trace import (
    DEFAULT_MAXIMUM,
    Trace,
    TraceError,
    load_trace,
    parse_trace,
)
from balloonctl.simulator.views import GuestView, HostView, RunContext
from balloonctl.units import GIB, MIB

TRACES = Path(__file__).parent / "data" / "traces"
SHIPPED = sorted(path for path in TRACES.iterdir() if path.suffix in (".csv", ".jsonl"))
SIMULATE = [sys.executable, "-m", "balloonctl.simulator.cli"]


def parse_csv(text: str) -> Trace:
    return parse_trace(text, "test.csv", name="test", json_lines=False)


def parse_jsonl(text: str) -> Trace:
    return parse_trace(text, "test.jsonl", name="test", json_lines=True)


# Trace parsing


def test_csv_trace_with_cache_and_directives() -> None:
    trace = parse_csv(
        "# a comment\n"
        "# @host-memory 8 GiB\n"
        "# @maximum web 2 GiB\n"
        "time,guest,demand,cache\n"
        "0,web,300 MiB,100 MiB\n"
        "0,db,1 GiB,\n"
        "\n"
        "60,web,500 MiB,0 MiB\n"
        "120,db,1 GiB,\n"
    )

    assert trace.host_memory == 8 * GIB
    assert trace.end == 120
    web, db = trace.guests
    assert web.name == "web"
    assert web.maximum == 2 * GIB
    assert [point.demand for point in web.points] == [300 * MIB, 500 * MIB]
    assert [point.cache for point in web.points] == [100 * MIB, 0]
    assert db.maximum == DEFAULT_MAXIMUM
    assert db.points[0].cache == 0


def test_jsonl_trace_matches_csv() -> None:
    trace = parse_jsonl(
        "# @maximum web 2 GiB\n"
        '{"time": 0, "guest": "web", "demand": "300 MiB", "cache": "100 MiB"}\n'
        '{"time": 60.5, "guest": "web", "demand": "500 MiB"}\n'
    )

    (web,) = trace.guests
    assert web.maximum == 2 * GIB
    assert web.points[1].time == 60.5
    assert web.points[1].demand == 500 * MIB
    assert web.points[1].cache == 0
    assert trace.end == 60.5


def test_step_values_keep_short_bursts() -> None:
    trace = parse_csv(
        "time,guest,demand\n"
        "0,web,100 MiB\n"
        "7,web,400 MiB\n"
        "8,web,100 MiB\n"
        "20,web,100 MiB\n"
    )

    demand, cache = trace.guests[0].step_values(5, 4)

    assert demand == [100 * MIB, 400 * MIB, 100 * MIB, 100 * MIB]
    assert cache == [0, 0, 0, 0]


GOOD_HEADER = "time,guest,demand\n"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("time,guest,memory\n0,a,1 MiB\n", [":1:", "unknown column 'memory'"]),
        ("time,guest\n0,a\n", [":1:", "lacks column 'demand'"]),
        ("time,guest,demand,demand\n", [":1:", "'demand' appears twice"]),
        (GOOD_HEADER + "0,a\n", [":2:", "expected 3 fields"]),
        (GOOD_HEADER + "soon,a,1 MiB\n", [":2:", "invalid time 'soon'"]),
        (GOOD_HEADER + "-5,a,1 MiB\n", [":2:", "invalid time '-5'"]),
        (GOOD_HEADER + "nan,a,1 MiB\n", [":2:", "invalid time 'nan'"]),
        (GOOD_HEADER + "0,a,300\n", [":2:", "demand", "'300'", "unit is required"]),
        (GOOD_HEADER + "0,a,3 GB\n", [":2:", "unknown unit 'GB'"]),
        (GOOD_HEADER + "0,a b,1 MiB\n", [":2:", "invalid guest name 'a b'"]),
        (GOOD_HEADER + "0,,1 MiB\n", [":2:", "invalid guest name ''"]),
        (
            GOOD_HEADER + "0,a,1 MiB\n10,a,1 MiB\n5,a,1 MiB\n",
            [":4:", "time 5 s is before the previous row's 10 s"],
        ),
        (
            GOOD_HEADER + "0,a,1 MiB\n0,a,2 MiB\n",
            [":3:", "second row for guest 'a' at time 0 s"],
        ),
        (
            GOOD_HEADER + "0,a,1 MiB\n30,b,1 MiB\n",
            [":3:", "guest 'b' first appears at time 30 s"],
        ),
        ("# @maxmem a 1 GiB\n" + GOOD_HEADER, [":1:", "unknown directive '@maxmem'"]),
        ("# @maximum a lots\n", [":1:", "@maximum", "'lots'"]),
        ("# @maximum a 0 MiB\n", [":1:", "must be greater than 0"]),
        (
            "# @maximum a 1 GiB\n# @maximum a 2 GiB\n",
            [":2:", "second @maximum for guest 'a'"],
        ),
        ("# @host-memory 1 GiB\n# @host-memory 2 GiB\n", [":2:", "second @host"]),
        (
            "# @maximum ghost 1 GiB\n" + GOOD_HEADER + "0,a,1 MiB\n9,a,1 MiB\n",
            [":1:", "guest 'ghost', which has no rows"],
        ),
        ("# only comments\n", ["missing header"]),
        (GOOD_HEADER, ["no rows"]),
        (GOOD_HEADER + "0,a,1 MiB\n", ["every row is at time 0"]),
    ],
)
def test_bad_csv_names_line_and_value(text: str, fragments: list[str]) -> None:
    with pytest.raises(TraceError) as caught:
        parse_csv(text)

    message = str(caught.value)
    assert message.startswith("test.csv")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("line", "fragments"),
    [
        ('{"time": 0, "guest": "a"', ["invalid JSON"]),
        ('[0, "a", "1 MiB"]', ["expected a JSON object"]),
        ('{"time": 0, "guest": "a", "demand": "1 MiB", "swap": "0 MiB"}', ["'swap'"]),
        ('{"time": 0, "guest": "a"}', ["missing key 'demand'"]),
        ('{"time": "0", "guest": "a", "demand": "1 MiB"}', ["invalid time '0'"]),
        ('{"time": true, "guest": "a", "demand": "1 MiB"}', ["invalid time True"]),
        ('{"time": 0, "guest": "a", "demand": 300}', ["invalid demand 300"]),
        ('{"time": 0, "guest": 7, "demand": "1 MiB"}', ["invalid guest 7"]),
        ('{"time": 1' + "0" * 400 + ', "guest": "a", "demand": "1 MiB"}', ["time"]),
        ('{"time": ' + "9" * 5000 + ', "guest": "a"}', ["invalid JSON"]),
        ('{"time": 0, "guest": "a", "demand": "1 MiB", "cache": "x"}', ["cache"]),
    ],
)
def test_bad_jsonl_names_line_and_value(line: str, fragments: list[str]) -> None:
    with pytest.raises(TraceError) as caught:
        parse_jsonl("# first line\n" + line + "\n")

    message = str(caught.value)
    assert message.startswith("test.jsonl:2:")
    for fragment in fragments:
        assert fragment in message


def test_missing_trace_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"

    with pytest.raises(TraceError) as caught:
        load_trace(path)

    assert str(caught.value) == f"{path}: file not found"


def test_shipped_traces_parse() -> None:
    names = {load_trace(path).name for path in SHIPPED}

    assert names == {"idle", "growth", "bursts", "daily", "cache", "host"}


# Guest model

MODEL = ModelParams()


def test_guest_swaps_demand_above_allocation() -> None:
    guest = Guest("g", 1 * GIB)

    event = guest.start_step(1 * GIB, 0, 5)

    assert not event
    assert guest.free == -MODEL.overhead
    assert guest.swapped == MODEL.overhead
    read_back = int(MODEL.overhead * MODEL.swap_in_share * 5)
    assert guest.swap_in == read_back
    assert guest.major_fault == read_back // 4


def test_guest_without_swap_leaves_counters() -> None:
    guest = Guest("g", 1 * GIB)

    guest.start_step(500 * MIB, 0, 5)

    assert guest.swapped == 0
    assert guest.swap_in == 0
    assert guest.major_fault == 0


def test_guest_oom_once_per_crossing() -> None:
    guest = Guest("g", 1 * GIB)
    limit = 1 * GIB - MODEL.overhead + MODEL.swap_limit

    assert not guest.start_step(limit, 0, 5)
    assert guest.start_step(limit + 1, 0, 5)
    assert not guest.start_step(limit + 1, 0, 5)
    assert guest.swapped == MODEL.swap_limit
    assert not guest.start_step(500 * MIB, 0, 5)
    assert guest.start_step(limit + 1, 0, 5)
    assert guest.oom_events == 2


def test_balloon_moves_at_finite_rate() -> None:
    guest = Guest("g", 4 * GIB)
    guest.start_step(100 * MIB, 0, 1)

    guest.set_target(1 * GIB)
    guest.move_balloon(1)
    assert guest.actual == 4 * GIB - MODEL.balloon_rate

    guest.set_target(4 * GIB)
    guest.move_balloon(0.5)
    assert guest.actual == 4 * GIB - MODEL.balloon_rate // 2


def test_inflation_stops_at_used_memory() -> None:
    guest = Guest("g", 4 * GIB)
    guest.start_step(1536 * MIB, 512 * MIB, 5)

    guest.set_target(1 * GIB)
    guest.move_balloon(60)

    assert guest.actual == MODEL.overhead + 1536 * MIB
    assert guest.stats(5).usable == 0


def test_inflation_waits_while_swapping() -> None:
    guest = Guest("g", 1 * GIB)
    guest.start_step(2 * GIB, 0, 5)

    guest.set_target(512 * MIB)
    guest.move_balloon(5)

    assert guest.actual == 1 * GIB


def test_target_cut_to_maximum() -> None:
    guest = Guest("g", 1 * GIB)

    guest.set_target(2 * GIB)

    assert guest.target == 1 * GIB


def test_cache_is_usable_but_not_unused() -> None:
    guest = Guest("g", 2 * GIB)
    guest.start_step(500 * MIB, 1 * GIB, 5)

    stats = guest.stats(10)

    assert stats.usable == 2 * GIB - MODEL.overhead - 500 * MIB
    assert stats.unused == stats.usable - 1 * GIB
    assert stats.available == 2 * GIB
    assert stats.last_update == 10


# Policies on small hand-checked cases


def stats(actual: int, unused: int, *, time: int = 0, usable: int = -1) -> GuestStats:
    return GuestStats(
        actual=actual,
        unused=unused,
        usable=unused if usable < 0 else usable,
        available=actual,
        swap_in=0,
        major_fault=0,
        last_update=time,
    )


def view(
    *guests: tuple[str, int, GuestStats], total: int, available: int, time: float = 0
) -> HostView:
    return HostView(
        step=int(time // 5),
        time=time,
        total=total,
        available=available,
        guests=tuple(
            GuestView(name, maximum, guest_stats.actual, guest_stats)
            for name, maximum, guest_stats in guests
        ),
    )


def test_seed_releases_above_buffer_only() -> None:
    policy = SeedPolicy(balloonctl_params(5))
    host = view(
        ("big", 2 * GIB, stats(2 * GIB, 300 * MIB)),
        ("small", 2 * GIB, stats(2 * GIB, 120 * MIB)),
        ("at_buffer", 2 * GIB, stats(2 * GIB, 100 * MIB)),
        ("tiny", 2 * GIB, stats(2 * GIB, 100 * MIB + 512)),
        total=16 * GIB,
        available=8 * GIB,
    )

    targets = policy.targets(host)

    assert targets == {"big": 2 * GIB - 50 * MIB, "small": 2 * GIB - 20 * MIB}


def test_seed_never_grows() -> None:
    policy = SeedPolicy(balloonctl_params(5))
    host = view(("g", 2 * GIB, stats(1 * GIB, 0)), total=16 * GIB, available=8 * GIB)

    assert policy.targets(host) == {}


def test_mom_shrinks_under_host_pressure() -> None:
    policy = MomPolicy()
    host = view(
        ("roomy", 4 * GIB, stats(4 * GIB, 1 * GIB)),
        ("full", 4 * GIB, stats(4 * GIB, 200 * MIB)),
        total=10 * GIB,
        available=1 * GIB,
    )

    targets = policy.targets(host)

    # 10 % host free: a guest keeps used + 10 % of its size, and shrinks by
    # at most 5 %. "full" would need 3.8 + 0.4 GiB, more than it has.
    assert targets == {"roomy": int(4 * GIB * 0.95)}


def test_mom_critical_pressure_forces_swap() -> None:
    policy = MomPolicy()
    host = view(("g", 4 * GIB, stats(4 * GIB, 0)), total=10 * GIB, available=256 * MIB)

    target = policy.targets(host)["g"]

    # 2.5 % host free makes the guest's free share -2.5 %: the target is
    # 97.5 % of a guest that uses all of its memory.
    assert abs(target - 4 * GIB * 0.975) <= 1


def test_mom_grows_without_pressure_every_10_s() -> None:
    policy = MomPolicy()
    guest = ("g", 4 * GIB, stats(2 * GIB, 1 * GIB))

    first = policy.targets(view(guest, total=10 * GIB, available=5 * GIB))
    second = policy.targets(view(guest, total=10 * GIB, available=5 * GIB, time=5))
    third = policy.targets(view(guest, total=10 * GIB, available=5 * GIB, time=10))

    assert first == {"g": int(2 * GIB * 1.05)}
    assert second == {}
    assert third == {"g": int(2 * GIB * 1.05)}


def test_mom_grow_capped_at_maximum() -> None:
    policy = MomPolicy()
    host = view(
        ("g", 2 * GIB, stats(2 * GIB - 10 * MIB, 0)),
        total=10 * GIB,
        available=5 * GIB,
    )

    assert policy.targets(host) == {"g": 2 * GIB}


def test_proxmox_shrinks_100_mib_per_guest() -> None:
    vms = {
        "a": VmStatus(
            balloon=4 * GIB, minimum=1 * GIB, maximum=4 * GIB, freemem=1 * GIB
        ),
        "b": VmStatus(
            balloon=4 * GIB, minimum=1 * GIB, maximum=4 * GIB, freemem=1 * GIB
        ),
    }

    result = compute_balloons(vms, goal=-1600 * MIB)

    assert result == {"a": 4 * GIB - 100 * MIB, "b": 4 * GIB - 100 * MIB}


def test_proxmox_shrink_never_grows_a_guest() -> None:
    vms = {
        "big": VmStatus(balloon=4 * GIB, minimum=1 * GIB, maximum=4 * GIB, freemem=GIB),
        "small": VmStatus(
            balloon=1200 * MIB, minimum=1 * GIB, maximum=4 * GIB, freemem=GIB
        ),
    }

    result = compute_balloons(vms, goal=-1 * GIB)

    assert result == {"big": 4 * GIB - 100 * MIB}


def test_proxmox_grows_guests_under_pressure_first() -> None:
    vms = {
        "pressed": VmStatus(
            balloon=2 * GIB, minimum=1 * GIB, maximum=4 * GIB, freemem=100 * MIB
        ),
        "roomy": VmStatus(
            balloon=2 * GIB, minimum=1 * GIB, maximum=4 * GIB, freemem=GIB
        ),
    }

    result = compute_balloons(vms, goal=8 * GIB)

    assert result == {"pressed": 2 * GIB + 100 * MIB}


def test_proxmox_ignores_goal_within_10_mib() -> None:
    vms = {
        "a": VmStatus(balloon=4 * GIB, minimum=1 * GIB, maximum=4 * GIB, freemem=GIB)
    }

    assert compute_balloons(vms, goal=-5 * MIB) == {}
    assert compute_balloons(vms, goal=5 * MIB) == {}


def test_proxmox_goal_from_host_usage() -> None:
    policy = ProxmoxPolicy()
    host = view(
        ("a", 4 * GIB, stats(4 * GIB, 1 * GIB)),
        ("b", 4 * GIB, stats(4 * GIB, 1 * GIB)),
        total=8 * GIB,
        available=0,
    )

    # Used 8 GiB against a goal of 6.4 GiB: both shrink by the 100 MiB step.
    assert policy.targets(host) == {"a": 4 * GIB - 100 * MIB, "b": 4 * GIB - 100 * MIB}
    later = HostView(1, 5, host.total, host.available, host.guests)
    assert policy.targets(later) == {}


def test_required_allocation_starts_early() -> None:
    assert required_allocation([100, 100, 500, 100], reach=200) == [100, 300, 500, 100]


def test_oracle_targets_next_steps_need() -> None:
    buffer = balloonctl_params(5).min_unused
    context = RunContext(
        period=5,
        model=MODEL,
        demand={"g": [200 * MIB, 200 * MIB, 600 * MIB]},
        maxima={"g": 2 * GIB},
    )
    policy = OraclePolicy(context, buffer)
    host = view(("g", 2 * GIB, stats(2 * GIB, 0)), total=8 * GIB, available=6 * GIB)

    targets = policy.targets(host)

    assert targets == {"g": MODEL.overhead + 200 * MIB + buffer}


def test_balloonctl_releases_then_grants() -> None:
    policy = BalloonctlPolicy(balloonctl_params(5))
    first = view(
        ("g", 4 * GIB, stats(2 * GIB, 1 * GIB)), total=8 * GIB, available=6 * GIB
    )
    released = 2 * GIB - 50 * MIB
    short = view(
        ("g", 4 * GIB, stats(released, 40 * MIB, time=5)),
        total=8 * GIB,
        available=6 * GIB,
        time=5,
    )

    assert policy.targets(first) == {"g": released}
    # 40 MiB free: grant back to the 100 MiB buffer plus the 64 MiB margin.
    assert policy.targets(short) == {"g": released + 124 * MIB}


def test_every_policy_runs_on_a_trace() -> None:
    trace = load_trace(TRACES / "idle.csv")

    for name in POLICIES:
        run = simulate(trace, name, 5)
        assert len(run.times) == 360, name
        assert all(actual <= 2 * GIB for actual in run.guests[0].actual), name


# The target over the shipped traces


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], Result]:
    table: dict[tuple[str, str], Result] = {}
    for path in SHIPPED:
        for result in evaluate(load_trace(path), ["seed", "balloonctl"], 5)[0]:
            table[result.trace, result.policy] = result
    return table


CACHE_SHORTFALL = pytest.mark.xfail(
    strict=True,
    reason="with the unused metric, balloonctl releases page cache only as "
    "MemFree rises, so it keeps some of the cache that the oracle releases",
)
TRACE_NAMES = [
    pytest.param(name, marks=CACHE_SHORTFALL) if name == "cache" else name
    for name in ("idle", "growth", "bursts", "daily", "cache", "host")
]


@pytest.mark.parametrize("trace", TRACE_NAMES)
def test_balloonctl_releases_90_percent(
    results: dict[tuple[str, str], Result], trace: str
) -> None:
    fraction = results[trace, "balloonctl"].oracle_fraction

    assert fraction is not None
    assert fraction >= 0.9


@pytest.mark.parametrize(
    "trace", ["idle", "growth", "bursts", "daily", "cache", "host"]
)
def test_balloonctl_never_out_of_memory(
    results: dict[tuple[str, str], Result], trace: str
) -> None:
    assert results[trace, "balloonctl"].oom_events == 0


def test_usable_metric_meets_target_on_cache_trace() -> None:
    (result,) = evaluate(load_trace(TRACES / "cache.jsonl"), ["balloonctl-usable"], 5)[
        0
    ][-1:]

    assert result.policy == "balloonctl-usable"
    assert result.oracle_fraction is not None
    assert result.oracle_fraction >= 0.9
    assert result.oom_events == 0


@pytest.mark.parametrize("trace", ["growth", "bursts"])
def test_seed_runs_out_of_memory(
    results: dict[tuple[str, str], Result], trace: str
) -> None:
    assert results[trace, "seed"].oom_events > 0


# The command line, as a child process


def run_simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SIMULATE, *args], capture_output=True, text=True, timeout=60
    )


def test_cli_prints_table() -> None:
    result = run_simulate(str(TRACES / "idle.csv"), "--policy", "balloonctl")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| trace | policy | released MiB | of oracle |")
    assert len(lines) == 3
    assert lines[2].startswith("| idle | balloonctl |")


def test_cli_json_has_every_policy() -> None:
    result = run_simulate(
        str(TRACES / "growth.csv"), str(TRACES / "cache.jsonl"), "--json"
    )

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["period_s"] == 5
    pairs = {(row["trace"], row["policy"]) for row in document["results"]}
    assert pairs == {
        (trace, policy) for trace in ("growth", "cache") for policy in POLICIES
    }


def test_cli_writes_plot(tmp_path: Path) -> None:
    plot = tmp_path / "idle.png"

    result = run_simulate(
        str(TRACES / "idle.csv"), "--policy", "seed", "--plot", str(plot)
    )

    assert result.returncode == 0, result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_trace_exits_2(tmp_path: Path) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text("time,guest,demand\n0,web,300 MiB\n60,web,3OO MiB\n")

    result = run_simulate(str(trace))

    assert result.returncode == 2
    assert f"{trace}:3: demand: invalid size '3OO MiB'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_rejects_overlong_trace(tmp_path: Path) -> None:
    trace = tmp_path / "long.csv"
    trace.write_text("time,guest,demand\n0,a,1 MiB\n1e9,a,1 MiB\n")

    result = run_simulate(str(trace))

    assert result.returncode == 2
    assert f"{trace}: the trace ends at 1e+09 s" in result.stderr
    assert "the limit is 1000000 steps" in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["/nonexistent/trace.csv"], "/nonexistent/trace.csv: file not found"),
        ([str(TRACES / "idle.csv"), "--period", "0"], "--period"),
        ([str(TRACES / "idle.csv"), "--host-memory", "8"], "unit is required"),
        ([str(TRACES / "idle.csv"), "--policy", "magic"], "invalid choice: 'magic'"),
        ([str(TRACES / "idle.csv"), "--plot", "out.svg"], "must end in .png"),
    ],
)
def test_cli_bad_usage_exits_2(args: list[str], fragment: str) -> None:
    result = run_simulate(*args)

    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
