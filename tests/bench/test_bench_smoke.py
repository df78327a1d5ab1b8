"""The benchmarks at tiny size, so that ``make bench`` keeps working.

This checks that every sub-benchmark runs and writes every figure with min,
median and max. It asserts no timing: speed is what the benchmarks report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

EXPECTED_FIGURES = {
    "reaction": [
        f"managed_{size}/{label}_{stat}"
        for size in (0, 5)
        for label in ("stats_period_set", "first_decision")
        for stat in ("p50", "p99", "max")
    ],
    "cost": [
        f"domains_5/period_1s/{name}"
        for name in (
            "controller_cpu_percent",
            "controller_us_per_domain_period",
            "floor_us_per_domain_period",
            "ratio_to_floor",
            "controller_ready_s",
        )
    ],
    "isolation": [
        f"domains_5/{phase}/{name}"
        for phase in ("baseline", "delayed")
        for name in ("lateness_p50", "lateness_p99", "lateness_max", "victim_samples")
    ],
    "memory": [
        f"domains_{size}/{name}"
        for size in (0, 5)
        for name in ("controller_rss_mib", "floor_rss_mib")
    ],
}


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = dict(os.environ, BENCH_SKIP_REAL="1")
    completed = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--tiny", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    document: dict[str, object] = json.loads(out.read_text())
    return document


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_benchmark_has_every_figure(tiny_results: dict[str, object], name: str) -> None:
    benchmarks = tiny_results["benchmarks"]
    assert isinstance(benchmarks, dict)
    result = benchmarks[name]
    assert result["skipped"] is None
    assert result["error"] is None
    assert sorted(result["figures"]) == sorted(EXPECTED_FIGURES[name])
    for key, figure in result["figures"].items():
        assert figure["runs"], key
        assert figure["min"] <= figure["median"] <= figure["max"], key
        assert figure["unit"], key
    assert len(result["load_before"]) == 3
    assert len(result["load_after"]) == 3


def test_real_benchmark_skipped_on_request(tiny_results: dict[str, object]) -> None:
    benchmarks = tiny_results["benchmarks"]
    assert isinstance(benchmarks, dict)
    assert benchmarks["real"]["skipped"] == "BENCH_SKIP_REAL=1"
    assert benchmarks["real"]["figures"] == {}


def test_machine_described(tiny_results: dict[str, object]) -> None:
    machine = tiny_results["machine"]
    assert isinstance(machine, dict)
    for key in ("cpu_model", "cpus", "python", "libvirt", "libvirt_python"):
        assert machine[key], key
    assert len(machine["load_at_start"]) == 3
