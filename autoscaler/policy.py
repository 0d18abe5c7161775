"""The cluster policy file (`stoke controller --autoscale cluster.yaml`): which pools of machines
stoke may use, what they cost, how much may be spent, and how fast to grow and shrink.

    pools:
      - name: cpu-spot
        provider: local            # or ec2
        instance_type: m7i.xlarge  # priced from the catalog unless price_per_hour is given
        market: spot
        zones: [us-east-1a, us-east-1b]
        min_nodes: 0
        max_nodes: 4
        offers: {slots: 2, cpu_memory: 8GiB}
    budget: {max_per_hour: 2.50}
    spot: {over_provision: 1, spread_zones: true, fallback: on_demand, return_to_spot_after: 10m}
    scaling: {upscale_delay: 0s, downscale_delay: 60s, smoothing: 0.5, cooldown: 10s}

Validated by pydantic; `load_policy` turns every problem into one line that names the key, the
value and the fix. Durations take `30s`/`10m`/`1h` or seconds; sizes `8GiB` or bytes.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autoscaler.catalog import Catalog, load_catalog
from node_agent.facts.units import parse_duration, parse_size

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


class PolicyError(ValueError):
    """The policy file is unusable; the message names each bad key and its fix."""


class Market(enum.StrEnum):
    SPOT = "spot"
    ON_DEMAND = "on_demand"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Offers(_Strict):
    """What one node of the pool gives stoke: instance slots and the memory they share."""

    slots: int = Field(default=1, ge=1, le=64)
    gpus: int = Field(default=0, ge=0, le=16)
    gpu_memory: int = 0
    """Bytes per GPU."""
    cpu_memory: int = 0
    """Bytes of memory instances may reserve (CPU nodes)."""

    @field_validator("gpu_memory", "cpu_memory", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)


class Ec2Settings(_Strict):
    """How the `ec2` provider launches a pool's nodes (standard AWS configuration, from the
    environment, does the rest: credentials, and the region unless given here)."""

    region: str | None = None
    ami: str = Field(pattern=r"^ami-[0-9a-f]{8,17}$")
    subnet_id: str | None = Field(default=None, pattern=r"^subnet-[0-9a-f]{8,17}$")
    security_group_ids: list[str] = Field(default_factory=list)
    key_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    node_args: list[str] = Field(default_factory=list)
    """Extra `stoke node` arguments for the user data's command line."""
    user_data: str | None = None
    """A user-data script of your own instead of stoke's (it must start `stoke node` with the
    `$STOKE_*` variables stoke's writes first)."""


class Pool(_Strict):
    name: str
    provider: Literal["local", "ec2"]
    instance_type: str = "local"
    market: Market = Market.ON_DEMAND
    price_per_hour: float | None = Field(default=None, ge=0)
    """USD per node-hour; the catalog's price for (instance_type, market) when not given."""
    zones: list[str] = Field(default_factory=lambda: ["local"])
    min_nodes: int = Field(default=0, ge=0)
    max_nodes: int = Field(default=4, ge=0, le=1000)
    offers: Offers = Field(default_factory=Offers)
    node_args: list[str] = Field(default_factory=list)
    """`local` provider: extra `stoke node` arguments (sizes, --threads)."""
    ec2: Ec2Settings | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(
                f"{value!r} is not a pool name: use 1-32 lowercase letters, digits and '-'"
            )
        return value

    @field_validator("zones")
    @classmethod
    def _zones(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("list one or more distinct zones")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Pool:
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) is above max_nodes ({self.max_nodes})")
        if self.provider == "ec2" and self.ec2 is None:
            raise ValueError("an ec2 pool needs an `ec2:` section (at least `ami`)")
        if self.provider == "local" and self.ec2 is not None:
            raise ValueError("`ec2:` settings are for provider ec2; remove them or change provider")
        return self


class Budget(_Strict):
    max_per_hour: float | None = Field(default=None, gt=0)
    """USD per hour the running nodes may cost at most; no launch goes past it."""


class SpotSettings(_Strict):
    """SpotHedge-style (SkyServe, EuroSys'25) handling of spot pools."""

    over_provision: int = Field(default=0, ge=0, le=100)
    """Spot nodes beyond what the load needs, so a preemption costs no capacity."""
    spread_zones: bool = True
    """Place spot nodes round-robin over the pool's zones (one zone's reclaim takes fewer)."""
    fallback: Literal["on_demand", "none"] = "on_demand"
    """When spot capacity is short (launch refused, or preempted), launch on-demand instead."""
    return_to_spot_after: float = 600.0
    """Seconds after a shortage before spot is tried again and on-demand fallbacks retire."""

    @field_validator("return_to_spot_after", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)


class ScalingSettings(_Strict):
    """How the node count follows demand, in the order applied (Ray Serve's and Knative's knobs)."""

    upscale_delay: float = 0.0
    """Seconds demand must stay above the node count before nodes are launched."""
    downscale_delay: float = 60.0
    """Seconds demand must stay below the node count before nodes are retired."""
    smoothing: float = Field(default=1.0, gt=0, le=1)
    """Weight of the newest demand sample (1: no smoothing; 0.2: slow exponential average)."""
    cooldown: float = 10.0
    """Seconds after a launch or retirement before the next change in the other direction."""
    launch_timeout: float = 600.0
    """A launched node that has not registered by then is terminated and launched again."""

    @field_validator(
        "upscale_delay", "downscale_delay", "cooldown", "launch_timeout", mode="before"
    )
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)


class ClusterPolicy(_Strict):
    pools: list[Pool] = Field(min_length=1)
    budget: Budget = Field(default_factory=Budget)
    spot: SpotSettings = Field(default_factory=SpotSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)

    @field_validator("pools")
    @classmethod
    def _unique(cls, pools: list[Pool]) -> list[Pool]:
        names = [p.name for p in pools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"pool names must be unique: {', '.join(dup)} repeated")
        return pools

    def pool(self, name: str) -> Pool:
        return next(p for p in self.pools if p.name == name)


class PricedPolicy:
    """A policy with every pool's price known (its own, or the catalog's)."""

    def __init__(self, policy: ClusterPolicy, prices: dict[str, float], sources: dict[str, str]):
        self.policy, self.prices, self.sources = policy, prices, sources

    def price(self, pool: str) -> float:
        """USD per node-hour of `pool`."""
        return self.prices[pool]


def price_policy(policy: ClusterPolicy, catalog: Catalog) -> PricedPolicy:
    """Each pool's price: its `price_per_hour`, else the catalog's row for its instance type and
    market; PolicyError naming the pool when neither exists."""
    prices: dict[str, float] = {}
    sources: dict[str, str] = {}
    missing: list[str] = []
    for pool in policy.pools:
        if pool.price_per_hour is not None:
            prices[pool.name], sources[pool.name] = pool.price_per_hour, "policy file"
            continue
        row = catalog.find(pool.instance_type, pool.market)
        if row is None:
            missing.append(
                f"pools.{pool.name}.price_per_hour: {pool.instance_type} ({pool.market}) is not "
                f"in the price catalog; give price_per_hour"
            )
            continue
        prices[pool.name], sources[pool.name] = row.price_per_hour, f"{row.source} ({row.date})"
    if missing:
        raise PolicyError("bad cluster policy:\n  " + "\n  ".join(missing))
    return PricedPolicy(policy, prices, sources)


def parse_policy(data: Any, *, source: str = "policy") -> ClusterPolicy:
    """A validated policy from parsed YAML; PolicyError with one line per problem."""
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a mapping with `pools:` (and budget, spot, scaling)")
    try:
        return ClusterPolicy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(
            f"{source}: bad cluster policy:\n  " + "\n  ".join(_lines(exc, data))
        ) from None


def load_policy(path: Path, catalog: Catalog | None = None) -> PricedPolicy:
    """Read, validate and price the policy file at `path`."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"{path}: {exc.strerror}; check the path") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
    policy = parse_policy(data, source=str(path))
    return price_policy(policy, catalog or load_catalog())


def _lines(exc: ValidationError, data: dict[str, Any]) -> list[str]:
    """`pools.cpu-spot.max_nodes: ...` rather than `pools.0.max_nodes` where the pool is named."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if len(loc) >= 2 and loc[0] == "pools" and loc[1].isdigit():
            pools = data.get("pools") or []
            i = int(loc[1])
            if i < len(pools) and isinstance(pools[i], dict) and pools[i].get("name"):
                loc[1] = str(pools[i]["name"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling (see the README's policy keys)"
        elif err["type"] == "missing":
            msg = "required; add it"
        where = ".".join(loc) or "policy"
        value = err.get("input")
        shown = (
            "" if err["type"] in ("missing",) or isinstance(value, dict) else f" (got {value!r})"
        )
        lines.append(f"{where}: {msg}{shown}")
    return lines
