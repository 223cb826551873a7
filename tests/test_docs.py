"""The docs hold together: every relative link resolves, every `moelab ...` command line in them parses (usage
synopses with [optional] parts go in ```text blocks), and code blocks tagged ```python run``` run."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moelab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(text: str):
    """(info string, body) of each fenced code block."""
    return re.findall(r"^```([^\n]*)\n(.*?)^```", text, re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def _command_lines():
    for page in PAGES:
        for info, body in _blocks(page.read_text()):
            if info.strip() not in ("", "bash", "sh", "console"):  # ```text blocks hold usage synopses
                continue
            for line in body.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if re.match(r"moelab (-|[a-z][a-z-]*( |$))", line):  # a command, not printed output ("moelab demo:")
                    yield page.name, line


@pytest.mark.parametrize("page,line", list(_command_lines()))
def test_command_lines_parse(page, line):
    argv = shlex.split(line.split(" #")[0], posix=True)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: `{line}` does not parse (exit {e.code})")


def _runnable():
    for page in PAGES:
        for info, body in _blocks(page.read_text()):
            if info.strip() == "python run":
                yield page.name, body


@pytest.mark.parametrize("page,code", list(_runnable()))
def test_runnable_blocks_run(page, code, tmp_path):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, f"{page}: {out.stderr[-2000:]}"
