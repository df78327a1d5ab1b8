"""``pip install .`` into a fresh virtual environment, and the help text."""

import argparse
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from balloonctl.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def project_version() -> str:
    document = tomllib.loads((ROOT / "pyproject.toml").read_text())
    version: str = document["project"]["version"]
    return version


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install a copy of the source tree, non-editable, into a new venv.

    The copy keeps the build's scratch directories out of the work tree.
    pip fetches the build backend and the dependencies from the package
    index (or its cache), as an operator's ``pip install`` would.
    """
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "balloonctl",
        source / "balloonctl",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    result = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return venv


def test_installed_command_prints_version(installed: Path) -> None:
    result = subprocess.run(
        [str(installed / "bin" / "balloonctl"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"balloonctl {project_version()}"


def test_installed_command_prints_help(installed: Path) -> None:
    result = subprocess.run(
        [str(installed / "bin" / "balloonctl"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )

    assert result.returncode == 0, result.stderr
    for command in ("run", "plan", "check-config", "simulate"):
        assert command in result.stdout


def test_installed_package_is_a_copy(installed: Path) -> None:
    python = installed / "bin" / "python"
    result = subprocess.run(
        [str(python), "-c", "import balloonctl; print(balloonctl.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(installed))


def test_version_is_not_repeated_in_code() -> None:
    version = project_version()
    for path in (ROOT / "balloonctl").rglob("*.py"):
        assert version not in path.read_text(), path


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = [
        action
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    return dict(commands.choices)


@pytest.mark.parametrize("command", ["run", "plan", "simulate"])
def test_every_option_help_gives_default(command: str) -> None:
    parser = subcommands()[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        assert action.help is not None, action.option_strings
        assert "default" in action.help, action.option_strings
