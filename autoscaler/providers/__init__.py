"""Node providers, by the name a pool's `provider:` gives (`local`, `ec2`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from autoscaler.policy import Pool
from autoscaler.providers.base import Provider


def make_provider(name: str, *, home: Path, cluster: str, pools: Sequence[Pool] = ()) -> Provider:
    """The provider called `name`; `home` is where it may keep files, `cluster` names this
    cluster's nodes (EC2 tags), `pools` are the policy's (EC2: the regions to list)."""
    if name == "local":
        from autoscaler.providers.local import LocalProvider

        return LocalProvider(home / "local-nodes")
    if name == "ec2":
        from autoscaler.providers.ec2 import Ec2Provider

        return Ec2Provider.for_pools(cluster, pools)
    raise ValueError(f"unknown provider {name!r}: choose local or ec2")
