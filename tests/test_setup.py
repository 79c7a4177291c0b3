"""The README's set-up commands are exactly what CI runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.startswith("python -m ")]


def test_ci_runs_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    readme_commands = [line.strip() for line in setup.strip().splitlines()]
    ci_commands = [c for c in _ci_commands() if "--upgrade pip" not in c]
    assert len(readme_commands) == 2
    assert ci_commands == readme_commands


def test_package_imports_and_exposes_version() -> None:
    import lightly_cotap

    assert lightly_cotap.__version__
    assert lightly_cotap.ContinuousAPLoss is not None
