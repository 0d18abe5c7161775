"""The fault suite, short: `stoke bench faults` on a slice of the real AWS spot trace (a node
preempted through the loopback IMDS, one joining), under load, against the reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cluster_fixtures import cluster_env

REPO = Path(__file__).resolve().parents[1]
TRACES = Path(__file__).resolve().parent / "data" / "traces"  # copies: see their README


def test_a_short_spot_trace_replay_loses_nothing_and_every_output_equals_the_reference(
    tmp_path: Path,
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "stoke.cli", "bench", "faults", "--ticks", "127:134",
         "--trace", str(TRACES / "preemption_4-node_aws-08-03-2023_us-east-1f_v100_1.json"),
         "--arrivals", str(TRACES / "AzureLLMInferenceTrace_conv_head300.csv"),
         "--tick-s", "2", "--rate", "3", "--notice-s", "2", "--json",
         "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=cluster_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    faults = result["faults"]
    assert faults["sent"] >= 10 and faults["completed"] + faults["failed"] == faults["sent"]
    assert faults["lost"] == 0, faults["errors"]
    assert (faults["differ"], faults["duplicated"], faults["skipped"]) == (0, 0, 0)
    assert result["preemptions"] == 1 and result["joined"] == 1, result["events"]
    assert result["baseline"]["lost"] == 0 and result["baseline"]["differ"] == 0
    assert result["migrations_before_deadline"] == result["migrations_handed_over"]
