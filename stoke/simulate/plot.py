"""`stoke simulate --plot OUT.png`: cost against p99 TTFT per run, and each run's node count and
spend over time. matplotlib is optional (the simulator itself does not need it): without it
`--plot` says how to install it before anything is simulated."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stoke.errors import StokeError
from stoke.simulate.metrics import RunResult, percentile

MATPLOTLIB = "matplotlib==3.10.3"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise StokeError(
            f"--plot needs matplotlib, which is not installed; pip install {MATPLOTLIB} "
            f"(or leave out --plot)"
        ) from None


def plot(results: Sequence[RunResult], out: Path) -> None:
    """Three panels: cost vs p99 TTFT (one point per run), nodes over time, spend over time."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    fig, (tradeoff, nodes, spend) = plt.subplots(1, 3, figsize=(16, 4.8))
    for r in results:
        p99 = percentile(r.ttfts, 99)
        tradeoff.scatter([p99], [r.cost_total / r.hours if r.hours else 0.0], s=40)
        tradeoff.annotate(r.label, (p99, r.cost_total / r.hours if r.hours else 0.0), fontsize=8)
        hours = [(s.t - r.timeline[0].t) / 3600 for s in r.timeline] if r.timeline else []
        nodes.plot(hours, [sum(s.nodes.values()) for s in r.timeline], label=r.label)
        spend.plot(hours, [s.spent for s in r.timeline], label=r.label)
    tradeoff.set(xlabel="TTFT p99 (s)", ylabel="cost per hour (USD)", title="cost vs p99 TTFT")
    nodes.set(xlabel="hours", ylabel="nodes (all pools)", title="nodes over time")
    spend.set(xlabel="hours", ylabel="spent so far (USD)", title="spend over time")
    nodes.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise StokeError(f"--plot {out}: cannot write it ({why}); check the path") from None
    finally:
        plt.close(fig)
