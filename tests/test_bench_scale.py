"""The scale benchmark's tree: the shape plan() promises, and gentree writing exactly it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks import bench_scale, common


def recount(text: str) -> dict[str, int]:
    """Entries by kind, read back from the plan text gentree executes."""
    kinds = {"D": 0, "F": 0, "H": 0, "S": 0}
    for line in text.splitlines():
        op, *fields = line.split()
        kinds[op] += 1 if op == "D" else int(fields[1] if op != "H" else fields[2])
    return kinds


@pytest.mark.parametrize("entries", [1000, 20_000, 400_000, 1_500_000])
def test_plan_has_exactly_the_entries_asked_for(entries: int) -> None:
    p = bench_scale.plan(entries)
    kinds = recount(p.text())
    assert sum(kinds.values()) == entries == p.entries
    assert (kinds["D"], kinds["F"], kinds["H"], kinds["S"]) == (
        p.dirs,
        p.files,
        p.links,
        p.symlinks,
    )


def test_plan_at_400000_has_the_issue_shape() -> None:
    p = bench_scale.plan(400_000)
    s = bench_scale.shape(p)
    assert s["largest directory"] == bench_scale.MAX_DIR
    assert s["smallest directory"] <= 1
    assert s["deepest level"] > bench_scale.CHAIN_DEPTH
    assert s["hard links"] > 10_000 and s["symlinks"] > 10_000
    assert s["names of 129+ bytes"] > 10_000
    # Directories of every order of magnitude between.
    sizes = set(p.dir_entries.values())
    for low in (1, 10, 100, 1000, 10_000):
        assert any(low <= n < 10 * low for n in sizes), low


def test_hard_links_stay_under_one_policy() -> None:
    """ext4 refuses (EXDEV) a hard link between directories of different fscrypt policies."""
    p = bench_scale.plan(20_000)
    parent = {}
    for line in p.lines:
        if line.startswith("D "):
            _, ident, par, _name = line.split()
            parent[int(ident)] = int(par)

    def top(d: int) -> int:
        while parent.get(d, 0) != 0:
            d = parent[d]
        return d

    links = [tuple(map(int, line.split()[1:3])) for line in p.lines if line.startswith("H ")]
    assert links
    assert all(top(d) == top(src) for d, src in links)


def test_gentree_writes_the_planned_tree(tmp_path: Path) -> None:
    gentree = bench_scale.compile_gentree(tmp_path / "gentree")
    p = bench_scale.plan(1000)
    root = tmp_path / "tree"
    root.mkdir()
    for top in p.tops:
        (root / top).mkdir()
    subprocess.run([gentree, root], input=p.text().encode(), check=True)
    names, links, symlinks, longest = 0, 0, 0, 0
    for _dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            names += 1
            longest = max(longest, len(name.encode()))
        links += sum(1 for f in filenames if f.startswith("H"))
    for path in root.rglob("L*"):
        symlinks += path.is_symlink()
    assert names == p.entries
    assert longest > bench_scale.LONG_NAME_MIN
    assert symlinks >= p.symlinks
    deep = max(len(Path(d).relative_to(root).parts) for d, _, _ in os.walk(root))
    assert deep == max(p.depth.values())
    shared = [f for f in (root / "home00").rglob("*") if f.is_file() and not f.is_symlink()]
    assert any(f.stat().st_nlink > 1 for f in shared)
    assert links >= p.links


def test_gentree_rejects_a_bad_plan(tmp_path: Path) -> None:
    gentree = bench_scale.compile_gentree(tmp_path / "gentree")
    proc = subprocess.run(
        [gentree, tmp_path], input=b"F 0 10 1 300 5 1\n", capture_output=True, check=False
    )
    assert proc.returncode == 1
    assert re.search(rb"line 1: bad plan line", proc.stderr)


def test_report_table_keeps_a_pipeline_in_one_cell():
    """The workloads are shell pipelines; an unescaped "|" splits their cell in Markdown."""
    lines: list[str] = []
    common.print_table(["workload", "seconds"], [["find DIR | wc -l", "1.00"]], lines.append)
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in lines]
    assert all(len(c) == 2 for c in cells), lines
    assert cells[2][0].strip() == r"find DIR \| wc -l"
