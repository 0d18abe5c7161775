"""`stoke simulate`'s event loop on small real excerpts: every request is served in virtual time,
the decisions are the controller's own functions (swapping one changes the outcome), spot drops
preempt with nothing lost, and the cost is the ledger's node-hours x price."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest

import autoscaler.decide
import controller.autoscale
import controller.policy
from autoscaler.policy import PricedPolicy, load_policy
from stoke.cli import main
from stoke.simulate.config import SimConfig
from stoke.simulate.metrics import RunResult
from stoke.simulate.runs import Variant, simulate
from stoke.simulate.traces import read_requests, read_spot

DATA = Path(__file__).parent / "data" / "traces"
CONV = DATA / "AzureLLMInferenceTrace_conv_head300.csv"
SPOT = DATA / "preemption_4-node_aws-08-03-2023_us-east-1f_v100_1.json"
REPO = Path(__file__).parent.parent

POLICY = """
pools:
  - name: gpu-{name}
    provider: local
    market: {market}
    price_per_hour: {price}
    zones: [a, b]
    min_nodes: {min_nodes}
    max_nodes: 8
    offers: {{slots: 1, gpus: 1, gpu_memory: 16GiB}}
spot: {{fallback: none}}
scaling: {{upscale_delay: 0s, downscale_delay: 60s, cooldown: 10s}}
"""


def policy(
    tmp_path: Path, market: str = "on_demand", price: float = 3.0, min_nodes: int = 0
) -> PricedPolicy:
    """A one-pool policy; `min_nodes=8` makes the cluster a fixed 8 nodes."""
    path = tmp_path / f"{market}.yaml"
    name = market.replace("_", "-")
    path.write_text(POLICY.format(market=market, name=name, price=price, min_nodes=min_nodes))
    return load_policy(path)


def run(pol: PricedPolicy, spot: tuple[Path, ...] = (), **overrides: Any) -> RunResult:
    config = dataclasses.replace(
        SimConfig(functions=4, hours=0.1, warmup_s=0.0, boot_s=30.0, seed=1), **overrides
    )
    trace = read_requests(CONV)
    return simulate(Variant("test", pol, config), trace, [read_spot(p) for p in spot])


def test_every_request_is_served_in_virtual_time(tmp_path: Path) -> None:
    started = time.perf_counter()
    result = run(policy(tmp_path))
    assert time.perf_counter() - started < 30  # six simulated minutes, no sleeping
    s = result.summary()
    assert s["requests"] > 300  # the 300-request excerpt repeats to fill 6 minutes
    assert s["lost"] == 0 and s["completed"] == s["requests"]
    assert len(result.ttfts) == s["requests"]
    assert s["cold_starts_total"] >= 4  # each function started at least once
    assert 0 < s["ttft_p50_s"] <= s["ttft_p95_s"] <= s["ttft_p99_s"]
    assert result.hours >= 0.1


def test_same_seed_same_result_other_seed_other_workload(tmp_path: Path) -> None:
    pol = policy(tmp_path)
    first, again, other = run(pol), run(pol), run(pol, seed=2)
    assert first.summary() == again.summary()
    assert first.ttfts != other.ttfts


def test_cost_is_node_hours_times_price(tmp_path: Path) -> None:
    """The ledger's total against the node count sampled once a minute, times the price."""
    result = run(policy(tmp_path, price=3.0), hours=0.5)
    sampled = sum(sum(x.nodes.values()) for x in result.timeline) / 60  # node-hours
    assert sampled > 1
    assert result.cost_total == pytest.approx(3.0 * sampled, rel=0.1)
    assert result.cost_total == pytest.approx(3.0 * sum(result.node_hours.values()))


def test_node_decisions_are_autoscaler_decide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the real decide nodes are launched; with one that never acts nothing is served."""
    calls = []
    real = autoscaler.decide.decide

    def spy(*args: Any) -> autoscaler.decide.Decision:
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(autoscaler.decide, "decide", spy)
    served = run(policy(tmp_path), hours=0.02).summary()
    assert calls and served["completed"] > 0

    def idle(now: float, nodes: Any, demand: Any, pol: Any, state: Any) -> Any:
        return autoscaler.decide.Decision((), state, 0)

    monkeypatch.setattr(autoscaler.decide, "decide", idle)
    starved = run(policy(tmp_path), hours=0.02).summary()
    assert starved["completed"] == 0 and starved["lost"] == starved["requests"] > 0


def test_placement_is_controller_policy_decide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forcing `random` inside the real decide changes locality's cold starts by tier."""
    pol = policy(tmp_path)
    base = run(pol, functions=8).summary()
    real = controller.policy.decide

    def always_random(cluster: Any, fn: Any, policy: str = "locality", rng: Any = None) -> Any:
        return real(cluster, fn, "random", rng)

    monkeypatch.setattr(controller.policy, "decide", always_random)
    swapped = run(pol, functions=8).summary()
    assert swapped["cold_starts"] != base["cold_starts"]


def test_keep_alive_is_controller_autoscale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short keep-alive stops idle instances (more cold starts, less idle time than a long
    one); with autoscale swapped for one that never stops anything, the short one does not.
    On a fixed cluster: the node autoscaler retires no node (which would stop instances too)."""
    pol = policy(tmp_path, min_nodes=8)
    short = run(pol, keep_alive="10s", functions=8)
    long = run(pol, keep_alive="10m", functions=8)
    assert sum(short.counters.cold_starts.values()) > sum(long.counters.cold_starts.values())
    assert short.counters.idle_instance_s < long.counters.idle_instance_s
    monkeypatch.setattr(controller.autoscale, "autoscale", lambda cluster, fns: [])
    never = run(pol, keep_alive="10s", functions=8)
    assert sum(never.counters.cold_starts.values()) < sum(short.counters.cold_starts.values())


def test_spot_drop_preempts_with_notice_and_loses_nothing(tmp_path: Path) -> None:
    """The excerpt's tick 20 drops from 4 nodes to 1: the zones lose nodes, their requests
    move (or resume at the deadline; a 5 s notice leaves none time to finish), and every
    request still completes."""
    counts = read_spot(SPOT).counts
    assert counts[19] == 4 and counts[20] == 1
    result = run(
        policy(tmp_path, "spot", 1.0), (SPOT,), hours=0.15, spot_start_s=19 * 300.0 - 240.0,
        target_concurrency=16, notice_s=5.0,
    )  # fmt: skip
    s = result.summary()
    assert s["preemptions"] >= 1
    assert s["preempted_requests"] >= 1
    assert s["migrations"] + s["resumed"] >= s["preempted_requests"]
    assert s["lost"] == 0


def test_cli_prints_runs_side_by_side_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    od, spot = tmp_path / "od.yaml", tmp_path / "spot.yaml"
    od.write_text(POLICY.format(market="on_demand", name="od", price=3.0, min_nodes=0))
    spot.write_text(POLICY.format(market="spot", name="spot", price=1.0, min_nodes=0))
    argv = ["simulate", "--trace", str(CONV), "--hours", "0.05", "--functions", "3", "--json",
            "--policy", str(od), "--policy", str(spot), "--spot-trace", str(SPOT)]  # fmt: skip
    assert main(argv) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in runs] == ["od", "spot"]
    assert all(r["lost"] == 0 for r in runs)
    assert runs[1]["cost_total_usd"] < runs[0]["cost_total_usd"]


def test_cli_errors_name_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--trace", str(tmp_path / "none.csv")]) == 2
    assert "--trace" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,a,1\n")
    od = str(REPO / "deploy" / "simulate" / "on-demand.yaml")
    assert main(["simulate", "--trace", str(bad), "--policy", od]) == 2
    assert "bad.csv line 2" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(CONV), "--placement", "closest"]) == 2
    assert "locality, random, least-loaded" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "sim.png"
    od = str(REPO / "deploy" / "simulate" / "on-demand.yaml")
    argv = ["simulate", "--trace", str(CONV), "--hours", "0.05", "--functions", "3",
            "--policy", od, "--plot", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
