"""The repository stands alone: no tracked file points at documents outside it, and docs/methods.md describes
every registered strategy and wrapper.

Convention checked here: each strategy and wrapper has a level-3 heading in docs/methods.md that names it in
backticks (``### `name` ``; one heading may name several, e.g. ``### `coreset` / `kcenter` ``). The registry is
read at test time, so a strategy added later fails this test until its section is written.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

import activelab
from activelab.strategies.wrappers import available_wrappers

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
# Built from pieces so that this file does not match itself.
FORBIDDEN = re.compile("|".join(["METHODS" + r"\.md", "DESIGN" + r"\.md", "IMBALANCE" + r"\.md", r"\.\./" + "shared"]))


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / name for name in out.split("\0") if name]


def documented_names(text: str) -> set[str]:
    """Names in backticks on the ``### `` heading lines of a markdown text."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("### "):
            names.update(re.findall(r"`([^`]+)`", line))
    return names


def test_no_tracked_file_mentions_outside_documents():
    offenders = []
    for path in tracked_files():
        if not path.is_file():  # deleted in the work tree but still in the index
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # binary files (figures)
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}")
    assert not offenders, (
        "these lines point at documents outside the repository; point at docs/methods.md (its section) or reword:\n"
        + "\n".join(offenders)
    )


def test_forbidden_pattern_catches_what_it_should():
    assert FORBIDDEN.search("see " + "METHODS" + ".md 1.7")
    assert FORBIDDEN.search("../" + "shared/x")
    assert not FORBIDDEN.search("see docs/methods.md, FK protocol")


def test_methods_page_has_a_section_per_strategy_and_wrapper():
    names = documented_names(METHODS.read_text(encoding="utf-8"))
    missing_strategies = sorted(set(activelab.available_strategies()) - names)
    missing_wrappers = sorted(set(available_wrappers()) - names)
    assert not missing_strategies and not missing_wrappers, (
        f"docs/methods.md lacks a '### `name`' section for strategies {missing_strategies} and wrappers "
        f"{missing_wrappers}: say what each computes, its defaults, complexity and deviations"
    )


def test_documented_names_reads_headings_only():
    text = "### `a` / `b`\nbody `c`\n## `d`\n### plain\n"
    assert documented_names(text) == {"a", "b"}


def test_readme_points_at_the_methods_page():
    assert "docs/methods.md" in (ROOT / "README.md").read_text(encoding="utf-8")
