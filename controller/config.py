"""The controller's own settings (YAML file, environment, flags), validated by pydantic."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from controller.policy import POLICIES

ADMIN_KEY_ENV = "STOKE_ADMIN_KEY"
INVOKE_KEY_ENV = "STOKE_INVOKE_KEY"


class ControllerConfigError(ValueError):
    """A controller setting is unusable; the message names it and the fix."""


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    home: Path = Path("~/.stoke/controller")
    http_listen: str = "127.0.0.1:8080"
    grpc_listen: str = "127.0.0.1:7070"
    secret: str = Field(default="", repr=False)
    """Shared gRPC secret (nodes must present it; the controller presents it to nodes)."""
    invoke_keys: list[str] = Field(default_factory=list, repr=False)
    admin_keys: list[str] = Field(default_factory=list, repr=False)
    policy: str = "locality"
    queue_limit: int = Field(default=64, ge=0)
    queue_timeout_s: float = Field(default=120.0, gt=0)
    load_timeout_s: float = Field(default=600.0, gt=0)
    heartbeat_interval_s: float = Field(default=2.0, ge=0.1)
    node_timeout_s: float = Field(default=10.0, gt=0)
    autoscale_interval_s: float = Field(default=1.0, gt=0)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    migration_max_delta: int = Field(default=1, ge=0)
    """Live migration hands over once the destination is at most this many tokens behind."""
    migration_follow_delta: int = Field(default=20, ge=1)
    """It stops its catch-up rounds and follows token by token once at most this many remain."""
    migration_max_rounds: int = Field(default=10, ge=1)
    """Answers from the destination before a migration hands over anyway, or gives up when
    the destination is too slow."""
    migration_round_timeout_s: float = Field(default=60.0, gt=0)
    """How long one round may take (round 0 prefills the whole context) before it aborts."""
    preemption_margin_s: float = Field(default=10.0, ge=0)
    """A preempted node's work is meant to be off it this long before its deadline."""
    preemption_max_concurrent: int = Field(default=4, ge=1)
    """Requests a preempted node's drain moves at once (longest move first)."""
    replacement: Literal["none", "local"] = "none"
    """Replacement capacity for a preempted node: `local` starts a `stoke node` process on this
    machine (controller/capacity.py); `none` only logs the need."""
    replacement_node_args: list[str] = Field(default_factory=list)
    """Extra `stoke node` arguments for local replacements (sizes, --slots, --threads)."""
    replacement_max_nodes: int = Field(default=4, ge=0)
    """Local replacement nodes started at most."""
    autoscale: Path | None = None
    """A cluster policy file (pools, prices, budget): the controller launches and retires
    nodes itself (controller/elastic.py). Without it, nodes are whatever was started."""
    cluster_name: str = Field(default="stoke", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Names this cluster's nodes at the providers (the `stoke:cluster` tag on EC2)."""

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; choose one of {', '.join(POLICIES)}")
        return value

    @field_validator("invoke_keys", "admin_keys")
    @classmethod
    def _strong_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if len(key) < 8:
                raise ValueError("API keys must be at least 8 characters")
        return keys

    @property
    def db_path(self) -> Path:
        return self.home.expanduser() / "controller.db"

    def check_ready(self) -> None:
        """Refuse to start without the secrets a controller needs."""
        if not self.secret:
            raise ControllerConfigError(
                "no gRPC shared secret: pass --secret or set $STOKE_SECRET."
            )
        if not self.admin_keys:
            raise ControllerConfigError(
                f"no admin API key: set admin_keys in the config file or ${ADMIN_KEY_ENV}."
            )
        if not self.invoke_keys:
            raise ControllerConfigError(
                f"no invoke API key: set invoke_keys in the config file or ${INVOKE_KEY_ENV}."
            )


def load_config(path: Path | None, overrides: dict[str, Any]) -> ControllerConfig:
    """The file's settings, then the environment's keys and secret, then `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ControllerConfigError(f"{path}: {exc.strerror}; check the path.") from None
        except yaml.YAMLError as exc:
            raise ControllerConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ControllerConfigError(f"{path}: expected a mapping of settings.")
        data.update(loaded or {})
    if os.environ.get(ADMIN_KEY_ENV):
        data["admin_keys"] = [os.environ[ADMIN_KEY_ENV]]
    if os.environ.get(INVOKE_KEY_ENV):
        data["invoke_keys"] = [os.environ[INVOKE_KEY_ENV]]
    if os.environ.get("STOKE_SECRET") and "secret" not in data:
        data["secret"] = os.environ["STOKE_SECRET"]
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ControllerConfig.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise ControllerConfigError("bad controller settings:\n  " + "\n  ".join(lines)) from None
