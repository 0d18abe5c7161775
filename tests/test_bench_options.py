"""`stoke bench engine --options` runs every option set against plain decoding and reports each
one's cost (the numbers themselves are the README's, from a quiet machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stoke.bench.engine_options import OPTION_SETS


def test_the_options_bench_reports_every_option_set(tiny_model_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stoke.cli", "bench", "engine", "--model", str(tiny_model_dir),
         "--options", "--batch-sizes", "2", "--rounds", "1", "--new-tokens", "10", "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report["batch"] == 2
    rows = {row["options"]: row for row in report["rows"]}
    assert set(rows) == set(OPTION_SETS)
    assert all(row["tok_s"] > 0 for row in rows.values())
    assert rows["plain"]["cost"] == 0
