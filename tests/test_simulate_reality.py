"""The simulator checked against reality: a slice of the Azure conversation trace runs on a real
local cluster (`stoke up --autoscale`, the tiny demo model, the openai client) and in the
simulator given the speeds measured on that cluster; cold starts, instance counts and TTFT p50
agree within `stoke.simulate.reality.Tolerance`. Plus the slice, the instance-count statistics
and the comparison on their own. (The trace readers' bad rows, empty files and unsorted
timestamps: tests/test_simulate_traces.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stoke.cli import main
from stoke.errors import StokeError
from stoke.simulate.reality import (
    Outcome,
    SliceSpec,
    Tolerance,
    _instance_stats,
    compare,
    take_slice,
)
from stoke.simulate.traces import read_requests

CONV = Path(__file__).parent / "data" / "traces" / "AzureLLMInferenceTrace_conv_head300.csv"
SLICE_S = 45
KEEP_ALIVE = "5s"
"""So that the slice has about ten cold starts: a simulator that kept instances alive for ever
(3 or 4) or stopped them at once (about 27) would be out of tolerance."""


def test_the_slice_thins_the_trace_keeps_its_times_and_scales_tokens() -> None:
    trace = read_requests(CONV)
    spec = SliceSpec(start_s=10.0, seconds=30.0, rate=1.0, functions=3, max_context=100)
    window = [r for r in trace if 10.0 <= r.arrival_s < 40.0]
    arrivals = take_slice(trace, spec)
    keep = round(len(window) / 30.0)
    assert keep > 1 and len(arrivals) == len(window[::keep])
    assert [a.at for a in arrivals] == pytest.approx(
        [r.arrival_s - window[0].arrival_s for r in window[::keep]]
    )
    for a, r in zip(arrivals, window[::keep], strict=True):
        assert a.context_tokens == min(100, max(1, round(r.context_tokens / 8)))
        assert a.generated_tokens == min(64, max(2, round(r.generated_tokens / 4)))
    names = [a.function for a in arrivals]
    assert set(names) <= {"fn-00", "fn-01", "fn-02"}
    assert names.count("fn-00") >= names.count("fn-02")  # Zipf: the first is the most popular
    assert [a.function for a in take_slice(trace, spec)] == names  # seeded


def test_a_slice_with_no_requests_is_refused() -> None:
    with pytest.raises(StokeError, match=r"0 request\(s\) in \[5000, 5060\) s; choose another"):
        take_slice(read_requests(CONV), SliceSpec(start_s=5000.0))


def test_instance_statistics_are_time_weighted_over_the_slice() -> None:
    # 0 until 2 s, 1 until 6 s, 2 until 8 s, 1 after (to 10 s): mean (4 + 4 + 2) / 10.
    peak, mean = _instance_stats([(0.0, 0), (2.0, 1), (6.0, 2), (8.0, 1), (12.0, 3)], 10.0)
    assert (peak, mean) == (2, pytest.approx(1.0))


def test_comparison_fails_what_is_out_of_tolerance() -> None:
    real = Outcome({"remote": 3, "dram": 9}, [0.020] * 10, 3, 2.0)
    close = Outcome({"remote": 3, "dram": 11}, [0.024] * 10, 4, 2.3)
    far = Outcome({"remote": 3}, [0.040] * 10, 5, 2.9)
    assert [r.ok for r in compare(real, close)] == [True, True, True, True, None]
    assert [r.ok for r in compare(real, far)] == [False, False, False, False, None]
    strict = Tolerance(cold_starts_abs=0, cold_starts_rel=0.0)
    assert compare(real, close, strict)[0].ok is False


def test_cli_errors_name_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate-check", "--seconds", "0", "--trace", str(CONV)]) == 2
    assert "--seconds 0: give a positive number" in capsys.readouterr().err
    assert main(["simulate-check", "--trace", "/nonexistent.csv"]) == 2
    assert "--trace /nonexistent.csv: no such file" in capsys.readouterr().err


def test_simulator_agrees_with_a_real_cluster_on_a_trace_slice(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    argv = [sys.executable, "-m", "stoke.cli", "simulate-check", "--json", "--trace", str(CONV),
            "--seconds", str(SLICE_S), "--keep-alive", KEEP_ALIVE, "--model", str(tiny_model_dir),
            "--work", str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    report = json.loads(done.stdout)
    shown = f"{json.dumps(report['rows'], indent=1)}\n{done.stderr[-2000:]}"
    real, sim = report["real"], report["simulated"]
    assert real["requests"] == sim["requests"] == report["requests"] > 20
    # Each function's first request loads its checkpoint from its source, on both sides ...
    hit = len(_functions(report))
    assert real["cold_starts"].get("remote") == sim["cold_starts"].get("remote") == hit, shown
    # ... and the short keep-alive makes the real cluster start instances again from DRAM.
    assert real["cold_starts"].get("dram", 0) >= 3, shown
    assert all(r["ok"] is not False for r in report["rows"]), shown
    assert report["ok"] and done.returncode == 0


def _functions(report: dict[str, object]) -> set[str]:
    spec = report["slice"]
    assert isinstance(spec, dict)
    arrivals = take_slice(read_requests(CONV), SliceSpec(**spec))
    return {a.function for a in arrivals}
