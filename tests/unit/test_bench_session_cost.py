"""bench/session_cost.py measures sessions that work: every reply delivered and matched.

Its table means something only if each session it times passes the requests and
replies it is handed, in both protocols and both modes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).parents[2] / "bench" / "session_cost.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120
    )


def test_it_prints_a_row_per_mode_and_request_with_both_protocols_timed() -> None:
    done = run("--sessions", "3", "--rounds", "5")
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [(r[0].strip(), r[1].strip()) for r in rows[1:]] == [
        ("async", "SET"),
        ("async", "GET"),
        ("sync", "SET"),
        ("sync", "GET"),
    ]
    for row in rows[1:]:
        assert float(row[2]) > 0 and float(row[3]) > 0
        assert row[4].strip().endswith("x")


def test_a_count_below_one_is_refused_with_the_flag_named() -> None:
    done = run("--rounds", "0")
    assert done.returncode == 2
    assert "--rounds" in done.stderr
