"""Print two benchmark result files side by side as a Markdown table.

``python -m tests.bench.compare BEFORE.json AFTER.json`` lists every figure
of AFTER with its median (and min to max) in both files, for
docs/performance.md.
"""

import json
import sys
from pathlib import Path
from typing import Any


def _cell(figure: dict[str, Any] | None) -> str:
    if figure is None:
        return "-"
    return (
        f"{_number(figure['median'])} ({_number(figure['min'])} to "
        f"{_number(figure['max'])})"
    )


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = [
        "| benchmark | figure | unit | before: median (min to max) "
        "| after: median (min to max) |",
        "|---|---|---|---|---|",
    ]
    for name, result in after["benchmarks"].items():
        old = before.get("benchmarks", {}).get(name, {}).get("figures", {})
        for key, figure in result["figures"].items():
            lines.append(
                f"| {name} | {key} | {figure['unit']} | {_cell(old.get(key))} "
                f"| {_cell(figure)} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.bench.compare BEFORE.json AFTER.json")
        return 2
    before, after = (json.loads(Path(path).read_text()) for path in argv)
    print(table(before, after))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
