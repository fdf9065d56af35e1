"""The README matches the code: every daemon option is documented, and the set-up commands are real."""

from __future__ import annotations

from pathlib import Path

from ckpt_watchd.cli import daemon_parser
from ckpt_watchd.settings import OPTIONS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_option_is_in_the_readme_table() -> None:
    """Each --option the CLI accepts has a row in the README's option table."""
    for o in OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        assert f"| `{flag}`" in README, flag


def test_readme_defaults_match_the_settings() -> None:
    """The defaults the README states are the ones the code uses (numbers and file lists)."""
    rows = {line.split("|")[1].strip().strip("`").split("`")[0]: line.split("|")[2]
            for line in README.splitlines() if line.startswith("| `--")}
    for o in OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        if isinstance(o.default, (int, float)) and not isinstance(o.default, bool) and o.name != "workers":
            assert f"`{o.default:g}`" in rows[flag], (flag, rows[flag])
        if isinstance(o.default, list):
            for item in o.default:
                assert f"`{item}`" in rows[flag], (flag, item)


def test_every_parser_flag_is_documented() -> None:
    """Nothing the parser accepts is missing from the README."""
    for action in daemon_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and not flag.startswith("--no-") and flag not in ("--help", "--version"):
                assert flag in README, flag


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run installs torch first and runs the README's pytest command."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0 && pip install -e '.[dev]' && python -m pytest" in README
    assert "torch==2.13.0" in ci and "-e '.[dev]'" in ci and "\npython -m pytest\n" in ci
    assert ci.index("torch==2.13.0") < ci.index("-e '.[dev]'")
