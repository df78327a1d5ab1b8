"""Pin docs/metrics.md and the shipped alert rules to the exposed metrics."""

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from balloonctl.hypervisor import DomainRef
from balloonctl.metrics import PrometheusMetrics
from balloonctl.policy import Action, Decision, Reason, Sample
from balloonctl.units import MIB

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "metrics.md"
ALERTS = ROOT / "contrib" / "prometheus" / "balloonctl-alerts.yml"
# The suffix that the text format adds to a family's name, by type.
SUFFIXES = {"counter": "_total", "info": "_info"}
# Labels of a family's samples that the format adds, not the code.
FORMAT_LABELS = {"le"}


def populated_metrics() -> PrometheusMetrics:
    """Return metrics in which every family has at least one series."""
    metrics = PrometheusMetrics()
    host = metrics.host("test:///default")
    host.connection(True)
    host.host_memory(4096 * MIB)
    domain = host.domain(DomainRef("6695eb01-f6a4-8304-79aa-97f2502e193f", "test"))
    domain.status("managed")
    sample = Sample(
        actual=1024 * MIB,
        unused=600 * MIB,
        maximum=2048 * MIB,
        last_update=1,
        taken_at=0.0,
        usable=700 * MIB,
    )
    release = Decision(Action.RELEASE, Reason.RELEASE, 974 * MIB, 50 * MIB, floor=0)
    domain.decided(sample, release)
    domain.requested(release)
    domain.requested(Decision(Action.GRANT, Reason.GRANT, 1024 * MIB, 50 * MIB))
    return metrics


def exposed() -> dict[str, tuple[str, set[str]]]:
    """Return exposed metric name -> (type, label names)."""
    families = {}
    for family in populated_metrics().registry.collect():
        name = family.name + SUFFIXES.get(family.type, "")
        labels = {label for sample in family.samples for label in sample.labels}
        families[name] = (family.type, labels - FORMAT_LABELS)
    return families


def documented() -> dict[str, tuple[str, set[str]]]:
    """Parse the metric tables of docs/metrics.md into name -> (type, labels)."""
    text = DOC.read_text()
    rows = {}
    for heading in ("## Metrics", "## Process metrics"):
        section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
        for row in section.splitlines():
            cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
            if len(cells) == 5 and cells[0].startswith("`"):
                labels = set(re.findall(r"`(\w+)`", cells[2]))
                rows[cells[0].strip("`")] = (cells[1], labels)
    return rows


def test_docs_list_exactly_the_exposed_metrics() -> None:
    assert set(documented()) == set(exposed())


def test_docs_give_each_metric_type_and_labels() -> None:
    docs = documented()

    for name, (kind, labels) in exposed().items():
        assert docs[name] == (kind, labels), name


def test_balloonctl_metrics_carry_prefix() -> None:
    own = [name for name in exposed() if not name.startswith(("process_", "python_"))]

    assert own
    for name in own:
        assert name.startswith("balloonctl_"), name


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_file_parses_with_rules() -> None:
    rules = alert_rules()

    names = {rule["alert"] for rule in rules}
    assert {
        "BalloonctlHostMemoryLow",
        "BalloonctlLibvirtDown",
        "BalloonctlBalloonStuck",
        "BalloonctlNoDecisions",
    } <= names
    for rule in rules:
        assert rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_alert_expressions_use_exposed_metrics() -> None:
    names = set(exposed())
    histograms = {name for name, (kind, _) in exposed().items() if kind == "histogram"}
    series = names | {h + suffix for h in histograms for suffix in ("_bucket", "_sum")}

    for rule in alert_rules():
        used = set(re.findall(r"\bballoonctl_[a-z_]+", rule["expr"]))
        assert used <= series, rule["alert"]


def test_docs_show_the_alert_file() -> None:
    text = DOC.read_text()
    block = text.split("## Alert rules", 1)[1].split("```yaml\n", 1)[1]
    block = block.split("```", 1)[0]
    shipped = "".join(
        line
        for line in ALERTS.read_text().splitlines(keepends=True)
        if not line.startswith("#")
    )

    assert block == shipped


def promtool() -> str | None:
    return os.environ.get("PROMTOOL") or shutil.which("promtool")


@pytest.mark.skipif(promtool() is None, reason="promtool is not installed")
def test_promtool_accepts_alert_rules() -> None:
    tool = promtool()
    assert tool is not None

    result = subprocess.run(
        [tool, "check", "rules", str(ALERTS)], capture_output=True, text=True
    )

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(promtool() is None, reason="promtool is not installed")
def test_promtool_finds_no_lint_in_scrape() -> None:
    tool = promtool()
    assert tool is not None
    scrape = generate_latest(populated_metrics().registry)

    result = subprocess.run(
        [tool, "check", "metrics"], input=scrape, capture_output=True
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == b""


@pytest.mark.skipif(promtool() is None, reason="promtool is not installed")
def test_promtool_rule_unit_tests_pass() -> None:
    tool = promtool()
    assert tool is not None
    tests = ALERTS.with_name("balloonctl-alerts.test.yml")

    result = subprocess.run(
        [tool, "test", "rules", tests.name],
        capture_output=True,
        text=True,
        cwd=tests.parent,
    )

    assert result.returncode == 0, result.stdout + result.stderr
