"""The benchmarks' chart: a PNG with matplotlib, and only a notice without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks import common

GROUPS = {
    "large (4 MiB files)": {"view (FUSE) tar": 2.4, "kernel ext4 tar": 1.1, "gocryptfs": 9.9},
    "small (0.5-8 KiB files)": {"view (FUSE) tar": 4.6, "kernel ext4 tar": 2.1},
}


def test_chart_is_a_png_with_one_panel_per_workload(tmp_path: Path) -> None:
    logged: list[str] = []
    png = tmp_path / "chart.png"
    assert common.write_chart(png, "title", GROUPS, "seconds", log=logged.append)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    # Two panels side by side: wider than tall.
    assert width > 1.5 * height
    assert logged == [f"chart written to {png}"]
    assert not common.write_chart(None, "title", GROUPS, "seconds", log=logged.append)


def test_without_matplotlib_the_benchmark_only_says_so(tmp_path: Path) -> None:
    png = tmp_path / "chart.png"
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from benchmarks import common\n"
        f"ok = common.write_chart({str(png)!r}, 't', {GROUPS!r}, 's')\n"
        "print(ok)\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    assert proc.stdout.strip() == "False"
    assert "matplotlib is not installed" in proc.stderr
    assert not png.exists()
