"""Man pages made from what the program itself knows, so they cannot drift.

ciphertextfs(8) is written from the argparse parsers that `--help` prints:
one section per registered command (whatever `cli.build_parser()` holds),
with its usage, description, every option and its epilog.
ciphertextfs-format(5) is docs/FORMAT.md converted to roff, with the
Markdown it uses: headings, paragraphs, fenced code, pipe tables, lists and
inline code, emphasis and links.

The pages are generated when the package is installed (`.ci/install` runs
`python -m ciphertextfs.manpage --mandir /usr/local/share/man`), never kept
as checked-in copies.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

from ciphertextfs import PROG, __version__

#: Where docs/FORMAT.md lies in a source tree (an editable install or a checkout).
FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"

SEE_ALSO = (
    ("ciphertextfs-format", 5),
    ("mount.fuse3", 8),
    ("fusermount3", 1),
    ("fstab", 5),
    ("systemd.mount", 5),
    ("fscrypt", 1),
    ("tar", 1),
    ("rsync", 1),
    ("getfattr", 1),
)


# -- roff primitives ----------------------------------------------------------


def escape(text: str) -> str:
    """Text safe in a roff line: backslashes escaped, no request at a line start."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def verbatim(lines: Sequence[str]) -> list[str]:
    """An indented no-fill block: examples, lists and tables kept as written."""
    lines = textwrap.dedent("\n".join(lines)).split("\n")
    return [".RS 4", ".nf", *(escape(ln) if ln.strip() else "" for ln in lines), ".fi", ".RE"]


def help_text(text: str) -> list[str]:
    """argparse description or epilog text (written for RawDescriptionHelpFormatter).

    Paragraphs are separated by blank lines.  A line at column 0 ending in
    ':' and starting in lower case is a heading ("exit status:", as
    argparse's own "options:"); a paragraph with indented lines is
    kept as written; any other paragraph is filled.
    """
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text.strip("\n")):
        lines = para.split("\n")
        while lines and re.fullmatch(r"[a-z].*:", lines[0]):
            out += [".PP", bold(lines[0][:-1])]
            lines = lines[1:]
        if not lines:
            continue
        out.append(".PP")
        if any(ln[:1].isspace() for ln in lines):
            out += verbatim(lines)
        else:
            out.append(escape(" ".join(ln.strip() for ln in lines)))
    return out


# -- ciphertextfs(8) ----------------------------------------------------------


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    return parser._get_formatter()


def usage(parser: argparse.ArgumentParser) -> str:
    text = parser.format_usage().strip()
    text = re.sub(r"^usage:\s*", "", text)
    return re.sub(r"\s+", " ", text)


def options(parser: argparse.ArgumentParser) -> list[str]:
    """One .TP entry per argument, positionals included, as --help lists them."""
    fmt = _formatter(parser)
    out: list[str] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        invocation = fmt._format_action_invocation(action)
        out += [".TP", bold(invocation)]
        text = fmt._expand_help(action) if action.help else ""
        out.append(escape(text) if text else "\\&")
    return out


def commands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of every registered command, in order."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, helps.get(name, ""), sub))
    return found


def th(name: str, section: int, title: str) -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        if epoch
        else datetime.datetime.now(datetime.UTC)
    )
    return f'.TH "{name.upper()}" "{section}" "{when:%Y-%m-%d}" "{PROG} {__version__}" "{title}"'


def program_page(parser: argparse.ArgumentParser) -> str:
    """ciphertextfs(8) from the top-level parser and every command's parser."""
    cmds = commands(parser)
    # No hyphenation: option names broken at a hyphen read as other options.
    out = [th(PROG, 8, "System Administration"), ".nh"]
    first = (parser.description or "").split(":")[0].strip().rstrip(".")
    out += [".SH NAME", f"{PROG} \\- {escape(first[:1].lower() + first[1:])}"]
    out.append(".SH SYNOPSIS")
    for _name, _help, sub in cmds:
        out += [".PP", escape(usage(sub))]
    out += [".PP", escape(f"{PROG} SOURCE MOUNTPOINT [-o OPTIONS]  (the form mount.fuse3 runs)")]
    out += [".PP", escape(usage(parser))]
    out.append(".SH DESCRIPTION")
    out += help_text(parser.description or "")
    out += help_text(parser.epilog or "")
    out.append(".PP")
    out.append("Commands:")
    for name, text, _sub in cmds:
        out += [".TP", bold(name), escape(text)]
    out.append(".SH OPTIONS")
    out += options(parser)
    for name, text, sub in cmds:
        out += [f'.SH "{PROG.upper()} {name.upper()}"', ".PP", bold(usage(sub))]
        if text:
            out += [".PP", escape(text[:1].upper() + text[1:] + ".")]
        if sub.description:
            out += help_text(sub.description)
        out += [".SS Options", *options(sub)]
        if sub.epilog:
            out += help_text(sub.epilog)
    out += [".SH FILES", ".TP", bold("/dev/log")]
    out.append(
        escape(
            "where a view running in the background without --log sends its warnings "
            "and errors (syslog; the journal on systemd machines), under the name "
            f"{PROG}."
        )
    )
    out.append(".SH SEE ALSO")
    out.append(",\n".join(f"\\fB{escape(n)}\\fR({s})" for n, s in SEE_ALSO))
    return "\n".join(out) + "\n"


# -- ciphertextfs-format(5) from Markdown -------------------------------------


def inline(text: str) -> str:
    """Markdown inline markup to roff: `code`, **bold**, *em*/_em_, [text](url)."""
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if len(part) > 1 and part.startswith("`") and part.endswith("`"):
            out.append(f"\\fB{escape(part[1:-1])}\\fR")
            continue
        part = escape(part)
        part = re.sub(r"\*\*([^*]+)\*\*", r"\\fB\1\\fR", part)
        part = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\\fI\1\\fR", part)
        part = re.sub(r"(?<![\w\\])_([^_\s][^_]*)_(?!\w)", r"\\fI\1\\fR", part)
        out.append(part)
    return "".join(out)


def _table(rows: list[list[str]]) -> list[str]:
    """A tbl table: the first column as wide as its longest cell, the others wrapped."""
    header, body = rows[0], rows[1:]
    n = len(header)

    def row(cells: list[str]) -> str:
        cells = (cells + [""] * n)[:n]
        rest = [f"T{{\n{inline(c)}\nT}}" for c in cells[1:]]
        return "\x07".join([inline(cells[0]), *rest])

    out = [".TS", "allbox tab(\x07);", " ".join(["lb"] * n), "l" + " lx" * (n - 1) + "."]
    out += [row(header), *(row(r) for r in body), ".TE"]
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_page(markdown: str, name: str, section: int, title: str, summary: str) -> str:
    """A man page from the Markdown subset our docs use."""
    out = ["'\\\" t", th(name, section, title), ".SH NAME", f"{escape(name)} \\- {escape(summary)}"]
    lines = markdown.split("\n")
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            out.extend([".PP", inline(" ".join(para))])
            para.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            block = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            out += [".PP", *verbatim(block)]
        elif m := re.match(r"(#{1,6})\s+(.*)", line):
            flush()
            level, text = len(m.group(1)), m.group(2).strip()
            if level == 1:
                out += [".SH DESCRIPTION", ".PP", inline(text) + "."]
            elif level == 2:
                out.append(f'.SH "{inline(text).upper()}"')
            else:
                out.append(f'.SS "{inline(text)}"')
        elif stripped.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = _cells(lines[i])
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            out += _table(rows)
            continue
        elif m := re.match(r"\s*([-*+]|\d+[.)])\s+(.*)", line):
            flush()
            marker = "\\(bu" if m.group(1) in "-*+" else m.group(1)
            item = [m.group(2)]
            i += 1
            while (
                i < len(lines)
                and lines[i].strip()
                and lines[i][:1].isspace()
                and not re.match(r"\s*([-*+]|\d+[.)])\s+", lines[i])
            ):
                item.append(lines[i].strip())
                i += 1
            out += [f'.IP "{marker}" 4', inline(" ".join(item))]
            continue
        elif not stripped:
            flush()
        else:
            para.append(stripped)
        i += 1
    flush()
    out += [".SH SEE ALSO", "\\fBciphertextfs\\fR(8)"]
    return "\n".join(out) + "\n"


def format_page(markdown: str) -> str:
    return markdown_page(
        markdown,
        f"{PROG}-format",
        5,
        "File Formats",
        "what the ciphertext view shows and what a backup of it holds",
    )


# -- installing -----------------------------------------------------------------


def write_pages(mandir: Path, format_md: Path | None) -> list[Path]:
    """Write man8/ciphertextfs.8 (and man5/ciphertextfs-format.5) below `mandir`."""
    from ciphertextfs.cli import build_parser

    written = []
    pages: list[tuple[Path, str]] = [(mandir / "man8" / f"{PROG}.8", program_page(build_parser()))]
    if format_md is not None:
        text = format_md.read_text(encoding="utf-8")
        pages.append((mandir / "man5" / f"{PROG}-format.5", format_page(text)))
    for path, text in pages:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)
        tmp.replace(path)
        written.append(path)
    return written


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ciphertextfs.manpage",
        description="Write the ciphertextfs(8) and ciphertextfs-format(5) man pages.",
    )
    p.add_argument("--mandir", type=Path, required=True, help="e.g. /usr/local/share/man")
    p.add_argument(
        "--format-md",
        type=Path,
        default=FORMAT_MD if FORMAT_MD.exists() else None,
        help="docs/FORMAT.md of the source tree (default: found next to the package)",
    )
    args = p.parse_args(list(argv) if argv is not None else None)
    for path in write_pages(args.mandir, args.format_md):
        print(path)
    if args.format_md is None:
        print("docs/FORMAT.md not found: ciphertextfs-format(5) not written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
