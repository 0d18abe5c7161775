"""Cluster policy files: the shipped examples load and price; each bad file is refused by
`stoke controller --autoscale` (and `stoke up --autoscale`) with a message naming the key and
the fix, before anything listens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cluster_fixtures import cluster_env

from autoscaler.catalog import CatalogError, load_catalog, parse_catalog
from autoscaler.policy import load_policy

REPO = Path(__file__).resolve().parent.parent
LOCAL_POOL = "  - {name: a, provider: local, price_per_hour: 0.1}\n"


@pytest.mark.parametrize("name", ["local.yaml", "aws-spot.yaml"])
def test_the_shipped_policies_load_and_are_priced(name: str) -> None:
    priced = load_policy(REPO / "deploy" / name)
    assert all(priced.price(p.name) >= 0 for p in priced.policy.pools)
    assert all(priced.sources[p.name] for p in priced.policy.pools)


def test_the_catalog_prices_a_pool_without_its_own_price(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "pools:\n  - {name: g, provider: ec2, instance_type: g5.xlarge, market: spot,"
        " ec2: {ami: ami-0123456789abcdef0}}\n"
    )
    priced = load_policy(path)
    row = load_catalog().find("g5.xlarge", "spot")
    assert row is not None and priced.price("g") == row.price_per_hour
    assert row.source in priced.sources["g"]
    with pytest.raises(CatalogError, match="line 2"):
        parse_catalog("instance_type,market,price_per_hour,source,date\nx,spot,cheap,s,d\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pools: [", "not valid YAML"),
        ("- 1\n", "expected a mapping with `pools:`"),
        ("budget: {max_per_hour: 1}\n", "pools: required; add it"),
        ("pools:\n  - {name: a, provider: local, max_nodes: 1, min_nodes: 3}\n",
         "pools.a: min_nodes (3) is above max_nodes (1)"),
        ("pools:\n  - {name: a, provider: local, colour: red}\n",
         "pools.a.colour: unknown key"),
        ("pools:\n  - {name: a, provider: gce}\n", "pools.a.provider"),
        ("pools:\n  - {name: a, provider: ec2}\n", "an ec2 pool needs an `ec2:` section"),
        ("pools:\n  - {name: a, provider: ec2, ec2: {ami: vmlinuz}}\n", "pools.a.ec2.ami"),
        ("pools:\n  - {name: a, provider: local, instance_type: x9.huge}\n",
         "pools.a.price_per_hour: x9.huge (on_demand) is not in the price catalog"),
        ("pools:\n" + LOCAL_POOL + LOCAL_POOL, "pool names must be unique: a repeated"),
        ("pools:\n" + LOCAL_POOL + "budget: {max_per_hour: 0}\n", "budget.max_per_hour"),
        ("pools:\n" + LOCAL_POOL + "scaling: {cooldown: soon}\n", "scaling.cooldown"),
        ("pools:\n" + LOCAL_POOL + "spot: {fallback: pray}\n", "spot.fallback"),
    ],
)  # fmt: skip
def test_a_bad_policy_is_refused_with_a_message_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "stoke.cli", "controller", "--autoscale", str(path),
         "--home", str(tmp_path / "home"), "--listen", "127.0.0.1:0",
         "--grpc-listen", "127.0.0.1:0"],
        capture_output=True, text=True, env=cluster_env(), timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "listening" not in out.stdout


def test_stoke_up_refuses_a_bad_policy_before_starting_anything(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("pools:\n  - {name: Bad_Name, provider: local}\n")
    out = subprocess.run(
        [sys.executable, "-m", "stoke.cli", "up", "--autoscale", str(path),
         "--home", str(tmp_path / "home"), "--port", "0"],
        capture_output=True, text=True, env=cluster_env(), timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "pools.0.name" in out.stderr or "is not a pool name" in out.stderr, out.stderr
    assert not (tmp_path / "home" / "controller").exists()
