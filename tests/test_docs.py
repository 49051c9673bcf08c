"""The manual: it builds strictly (a broken link, anchor or page left out of the nav fails), its
command reference is the program's own help, and the examples marked as run in the README and
the manual do what they say on the shipped model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- runs in the test suite (tests/test_docs.py) -->"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SAYS_WHETHER_IT_RUNS = re.compile(re.escape(MARK) + r"|<!-- not run: .+ -->")


def marked_examples() -> list[tuple[str, str, str]]:
    """(where, language, code) of every fenced block right after the mark."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(re.escape(MARK) + r"\n```(\w+)\n(.*?)```", text, re.S):
            line = text[: match.start()].count("\n") + 2
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1), match.group(2)))
    return found


def test_the_manual_builds_strictly_with_the_reference_from_help(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    # Every command and every option of `dalle2 serve --help` is in the reference.
    for name in ("text2im", "variation", "inpaint", "serve", "models verify", "config show"):
        assert f"dalle2 {name}</code>" in reference
    help_text = subprocess.run([sys.executable, "-m", "dalle2_cli", "serve", "--help"], capture_output=True, text=True)
    for option in re.findall(r"(--[a-z][a-z-]+)", help_text.stdout):
        assert option in reference, option


def test_a_broken_link_fails_the_build(tmp_path):
    """The build above is strict for real (mkdocs' -q would silence the warnings strict counts)."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    with open(tmp_path / "docs" / "index.md", "a") as page:
        page.write("\nSee [nowhere](#no-such-anchor).\n")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0 and "no-such-anchor" in result.stdout + result.stderr


def test_every_example_runs_here_or_says_why_not():
    """A shell or Python block is run by this suite, or a comment before it says why not (your
    own files, a server, hours of training): none is left out by oversight."""
    unmarked = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"(<!--[^\n]*-->\n)?```(bash|python)\n", text):
            if match.group(1) is None or not SAYS_WHETHER_IT_RUNS.match(match.group(1)):
                unmarked.append(f"{page.relative_to(ROOT)}:{text[: match.start()].count(chr(10)) + 1}")
    assert not unmarked, unmarked
    where = [example[0].split(":")[0] for example in marked_examples()]
    assert where.count("README.md") == 2 and {"docs/scale-out.md", "docs/python.md", "docs/commands.md"} <= set(where)


@pytest.mark.parametrize(("where", "language", "code"), marked_examples(), ids=lambda value: str(value)[:40])
def test_a_marked_example_runs(where, language, code, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if language == "bash":
        command = ["bash", "-e", "-c", code]
    else:
        assert language == "python", where
        command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"{where}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr
    made = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*.png"))
    assert made, f"{where} made no image"
