"""The man pages: made from the argparse definitions and docs/FORMAT.md, installed for man(1)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ciphertextfs import cli, manpage

ROOT = Path(__file__).resolve().parent.parent
FORMAT_MD = ROOT / "docs" / "FORMAT.md"


def render(page: Path) -> str:
    """The page as man(1) shows it, wide enough that option names are not hyphenated."""
    env = dict(os.environ, MANWIDTH="250", LC_ALL="C", MAN_KEEP_FORMATTING="")
    proc = subprocess.run(
        ["man", "--pager=cat", "-l", os.fspath(page)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def groff_warnings(page: Path) -> str:
    """groff's own complaints about the page (all warnings on, output discarded)."""
    proc = subprocess.run(
        ["groff", "-t", "-man", "-Tutf8", "-ww", "-z", os.fspath(page)],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stderr


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    mandir = tmp_path_factory.mktemp("man")
    written = manpage.write_pages(mandir, FORMAT_MD)
    return {p.name: p for p in written}


def every_parser() -> list[tuple[str, object]]:
    parser = cli.build_parser()
    return [("", parser)] + [(name, sub) for name, _help, sub in manpage.commands(parser)]


def test_program_page_has_every_command_and_every_option(pages: dict[str, Path]) -> None:
    page = pages["ciphertextfs.8"]
    assert groff_warnings(page) == ""
    text = render(page)
    # Unwrapped, since long lines may be broken between words.
    flat = re.sub(r"\s+", " ", text)
    names = [name for name, _sub in every_parser() if name]
    assert {"mount", "decrypt", "inspect", "demo"} <= set(names)
    for name, sub in every_parser():
        if name:
            assert re.search(rf"^CIPHERTEXTFS {name.upper()}$", text, re.M), name
            assert manpage.usage(sub) in flat, name
        for action in sub._actions:
            for opt in action.option_strings:
                assert re.search(rf"(^|[\s,\[]){re.escape(opt)}\b", flat), (name, opt)
            if action.help and action.help != "==SUPPRESS==":
                help_words = " ".join(sub._get_formatter()._expand_help(action).split())
                assert help_words in flat, (name, help_words)
            if not action.option_strings and action.metavar and name:
                assert action.metavar in flat, (name, action.metavar)
        for block in (sub.description, sub.epilog):
            for para in re.split(r"\n\s*\n", (block or "").strip()):
                lines = para.split("\n")
                while lines and re.fullmatch(r"[a-z].*:", lines[0]):
                    assert re.search(rf"^\s*{re.escape(lines[0][:-1])}$", text, re.M), lines[0]
                    lines = lines[1:]
                # Each paragraph's first words survive (filled or verbatim).
                head = " ".join(" ".join(lines).split()[:6])
                assert head in flat, (name, head)
    assert "exit status" in text


def test_format_page_follows_format_md(pages: dict[str, Path]) -> None:
    page = pages["ciphertextfs-format.5"]
    assert groff_warnings(page) == ""
    text = render(page)
    flat = re.sub(r"\s+", " ", text)
    md = FORMAT_MD.read_text()
    headings = re.findall(r"^(#{2,6})\s+(.*)$", md, re.M)
    assert headings
    for level, heading in headings:
        plain = heading.replace("`", "")
        assert (plain.upper() if level == "##" else plain) in text, heading
    # Every code span and every table cell's words reach the page.
    for code in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", md):
        assert " ".join(code.split()) in flat, code
    for line in md.splitlines():
        if line.startswith("|") and not re.fullmatch(r"[|\s:-]+", line):
            for cell in line.strip("|").split("|"):
                first = re.sub(r"[`*]", "", cell).split()[:1]
                if first:
                    assert first[0] in flat, cell
    # Fenced blocks are kept line by line.
    for block in re.findall(r"```\n(.*?)```", md, re.S):
        for ln in block.splitlines():
            if ln.strip():
                assert " ".join(ln.split()) in flat, ln


def test_markdown_conversion_of_each_construct() -> None:
    md = (
        "# Title\n\nSome *emphasis*, **bold**, `code-x` and [a link](http://x).\n\n"
        "## Part\n\n- one\n  continued\n- two\n\n1. first\n2. second\n\n"
        "| a | b |\n| --- | --- |\n| `x` | y z |\n\n```\n.starts with a dot\n  kept \\ as is\n```\n"
    )
    roff = manpage.markdown_page(md, "t", 7, "Test", "a test")
    assert "\\fIemphasis\\fR" in roff and "\\fBbold\\fR" in roff
    assert "\\fBcode\\-x\\fR" in roff and "a link" in roff and "http://x" not in roff
    assert '.IP "\\(bu" 4\none continued' in roff
    assert '.IP "1." 4\nfirst' in roff
    assert ".TS" in roff and "\\fBx\\fR\x07T{\ny z\nT}" in roff
    assert "\\&.starts with a dot" in roff and "  kept \\e as is" in roff


def test_installed_pages_are_current() -> None:
    """`man ciphertextfs` after `.ci/install` shows what the code defines now."""
    for name, section, fresh in (
        ("ciphertextfs", 8, manpage.program_page(cli.build_parser())),
        ("ciphertextfs-format", 5, manpage.format_page(FORMAT_MD.read_text())),
    ):
        proc = subprocess.run(["man", "-w", name], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"man -w {name}: {proc.stderr.strip()} (run .ci/install)"
        path = Path(proc.stdout.strip())
        assert path.name == f"{name}.{section}"
        installed = path.read_text()

        def body(roff: str) -> list[str]:
            return [ln for ln in roff.splitlines() if not ln.startswith(".TH ")]

        assert body(installed) == body(fresh), f"{path} is stale: run 'bash .ci/install'"
        shown = subprocess.run(
            ["man", "--pager=cat", name],
            capture_output=True,
            text=True,
            env=dict(os.environ, MANWIDTH="100"),
            check=True,
        ).stdout
        assert name.upper() in shown


def test_every_command_documents_the_one_exit_status_convention() -> None:
    """0 done, 1 done but for some reported entries, 2 usage or fatal error: in each --help."""
    for name, sub in every_parser():
        if not name:
            continue
        epilog = sub.epilog or ""
        rows = dict(
            re.findall(r"^  (\d+(?:, \d+)*)  (.*)$", epilog[epilog.index("exit status:") :], re.M)
        )
        assert set(rows) - {"130, 143"} <= {"0", "1", "2"}, (name, rows)
        assert {"0", "2"} <= set(rows), (name, rows)
        assert rows["2"].startswith("usage error"), (name, rows["2"])
        if "1" in rows:
            assert rows["1"].startswith("some "), (name, rows["1"])
