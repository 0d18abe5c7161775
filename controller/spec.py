"""The function spec: what a user writes in the YAML file given to `stoke deploy --config`.

The file is validated by pydantic models with `extra="forbid"`; every problem becomes one line of
a `SpecError` that names the key by its dotted path and says how to fix it. The smallest valid
file is `model: s3://bucket/prefix` (or no file at all and `--model`):

```yaml
model: s3://models/llama-3-8b
autoscaling:
  min_instances: 0
  max_instances: 4
  target_concurrency: 8
  keep_alive: 30s       # or adaptive, with keep_alive_fallback: 5m
slo:
  ttft_p99: 2s
```

Durations are `30s`, `5m`, `1h`, `1h30m` or a number of seconds; sizes are `4GiB`, `512MiB`,
`8G` (binary, as `8GiB`), `2GB` (decimal) or a number of bytes: the rules of
`node_agent.facts.units`, the same as for the `stoke` flags. `FunctionSpec.to_dict` writes the
same key names back with durations as seconds and sizes as bytes, so the result round-trips
through `spec_from_dict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from controller.spec_problems import MISSING_MODEL, describe
from node_agent.facts.units import parse_duration, parse_size

ADAPTIVE = "adaptive"
"""`autoscaling.keep_alive: adaptive`: keep-alive and pre-warm windows from the idle times."""
DEFAULT_KEEP_ALIVE_S = 300.0


class SpecError(ValueError):
    """A function spec that cannot be used. `problems` holds one line per bad key, each naming the
    key by its dotted path (`autoscaling.keep_alive`), the value and the fix; `str()` joins them."""

    def __init__(self, problems: list[str] | str, *, source: str | None = None) -> None:
        lines = [problems] if isinstance(problems, str) else list(problems)
        if source:
            lines = [f"{source}: {line}" for line in lines]
        self.problems: tuple[str, ...] = tuple(lines)
        self.source = source
        super().__init__("\n".join(lines))


# -- units ------------------------------------------------------------------------------------


def _as_duration(value: object) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise PydanticCustomError("duration", "{message}", {"message": str(exc)}) from None


def _as_size(value: object) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise PydanticCustomError("size", "{message}", {"message": str(exc)}) from None


# -- the schema -------------------------------------------------------------------------------

_CONFIG = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)


class Autoscaling(BaseModel):
    """How many instances run and when they stop."""

    model_config = _CONFIG

    min_instances: int = Field(default=0, ge=0, strict=True)
    """Instances kept running even with no traffic (0 allows scale-to-zero)."""
    max_instances: int = Field(default=4, ge=1, strict=True)
    """Most instances at once; must be >= min_instances."""
    target_concurrency: int = Field(default=8, ge=1, strict=True)
    """In-flight requests per instance before another instance is started."""
    keep_alive_s: float | Literal["adaptive"] = Field(
        default=DEFAULT_KEEP_ALIVE_S,
        validation_alias="keep_alive",
        serialization_alias="keep_alive",
    )
    """Seconds an instance may stay idle before it is stopped (`keep_alive` in YAML), or
    `adaptive`: windows learned from the function's idle times (`autoscaler.keepalive`)."""
    keep_alive_fallback_s: float | None = Field(
        default=None,
        validation_alias="keep_alive_fallback",
        serialization_alias="keep_alive_fallback",
    )
    """With `keep_alive: adaptive`, the fixed keep-alive used until the idle times show a
    pattern (too few of them, or spread evenly); None means 5 minutes."""

    @field_validator("keep_alive_s", mode="before")
    @classmethod
    def _duration_or_adaptive(cls, value: object) -> float | str:
        if isinstance(value, str) and value.strip().lower() == ADAPTIVE:
            return ADAPTIVE
        try:
            return parse_duration(value)
        except ValueError as exc:
            message = f"{exc}, or adaptive to learn it from the function's idle times"
            raise PydanticCustomError("duration", "{message}", {"message": message}) from None

    @field_validator("keep_alive_fallback_s", mode="before")
    @classmethod
    def _fallback_duration(cls, value: object) -> float | None:
        return None if value is None else _as_duration(value)

    @field_validator("keep_alive_fallback_s")
    @classmethod
    def _fallback_needs_adaptive(cls, value: float | None, info: ValidationInfo) -> float | None:
        keep_alive = info.data.get("keep_alive_s")
        if value is not None and keep_alive is not None and keep_alive != ADAPTIVE:
            raise PydanticCustomError(
                "fallback_without_adaptive",
                "only applies with keep_alive: adaptive; remove it, or set keep_alive: adaptive",
            )
        return value

    @property
    def adaptive(self) -> bool:
        """Whether keep-alive is learned from the function's idle times."""
        return self.keep_alive_s == ADAPTIVE

    @property
    def fixed_keep_alive_s(self) -> float:
        """The fixed keep-alive: `keep_alive` itself, or for `adaptive` its fallback."""
        if isinstance(self.keep_alive_s, float):
            return self.keep_alive_s
        if self.keep_alive_fallback_s is not None:
            return self.keep_alive_fallback_s
        return DEFAULT_KEEP_ALIVE_S

    @field_validator("max_instances")
    @classmethod
    def _max_at_least_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_instances")
        if low is not None and value < low:
            raise PydanticCustomError(
                "min_above_max",
                "{value} is below min_instances ({low}); raise max_instances to at least {low} "
                "or lower min_instances",
                {"value": value, "low": low},
            )
        return value


class Slo(BaseModel):
    """Latency the function must keep; the cost-aware autoscaler adds capacity to hold it."""

    model_config = _CONFIG

    ttft_p99_s: float | None = Field(
        default=None, validation_alias="ttft_p99", serialization_alias="ttft_p99"
    )
    """Time to first token that 99% of requests must beat (`ttft_p99` in YAML: 2s, 0.5s or a
    number of seconds); None: no target."""

    @field_validator("ttft_p99_s", mode="before")
    @classmethod
    def _positive_duration(cls, value: object) -> float | None:
        if value is None:
            return None
        try:
            seconds = parse_duration(value)
        except ValueError:
            message = f"{value!r} is not a duration; write 2s, 0.5s or a number of seconds"
        else:
            if seconds > 0:
                return seconds
            message = (
                f"{value!r} is no time at all; write the time to first token 99% of requests "
                "must beat, such as 2s or 0.5s, or leave ttft_p99 out"
            )
        raise PydanticCustomError("duration", "{message}", {"message": message})


class Resources(BaseModel):
    """What one instance needs on a node."""

    model_config = _CONFIG

    memory_bytes: int | None = Field(
        default=None, ge=1, validation_alias="memory", serialization_alias="memory"
    )
    """Device memory one instance reserves (`memory` in YAML: 4GiB, 512MiB or bytes); None means
    the controller infers it from the checkpoint."""

    @field_validator("memory_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> int | None:
        return _as_size(value)


class Generation(BaseModel):
    """Defaults applied to requests that omit a parameter, and limits on what they may ask."""

    model_config = _CONFIG

    max_tokens: int = Field(default=256, ge=1, strict=True)
    """Tokens to generate when a request does not say."""
    temperature: float = Field(default=1.0, ge=0, le=2, strict=True, allow_inf_nan=False)
    """Sampling temperature when a request does not say (0 is greedy)."""
    top_p: float = Field(default=1.0, gt=0, le=1, strict=True, allow_inf_nan=False)
    """Nucleus sampling mass when a request does not say."""
    max_tokens_limit: int | None = Field(default=None, ge=1, strict=True)
    """Most tokens a request may ask for; a request asking more gets 400. None: the context."""

    @field_validator("max_tokens_limit")
    @classmethod
    def _limit_covers_default(cls, value: int | None, info: ValidationInfo) -> int | None:
        default = info.data.get("max_tokens")
        if value is not None and default is not None and value < default:
            raise PydanticCustomError(
                "limit_below_default",
                "{value} is below max_tokens ({default}); raise max_tokens_limit to at least "
                "{default} or lower max_tokens",
                {"value": value, "default": default},
            )
        return value


class EngineSettings(BaseModel):
    """Engine knobs for each instance; None lets the node choose."""

    model_config = _CONFIG

    kv_cache_bytes: int | None = Field(
        default=None, ge=1, validation_alias="kv_cache", serialization_alias="kv_cache"
    )
    """Bytes for the KV cache (`kv_cache` in YAML: 256MiB or bytes)."""
    max_batch_size: int | None = Field(default=None, ge=1, strict=True)
    """Most sequences decoded together."""
    max_model_len: int | None = Field(default=None, ge=1, strict=True)
    """Longest prompt + completion, in tokens; at most the model's context."""

    @field_validator("kv_cache_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> int | None:
        return _as_size(value)


class FunctionSpec(BaseModel):
    """A deployed function: a model and how to run it.

    New sections go here as siblings of `autoscaling` (next: cost-aware policies — node pools
    with prices, spot vs on-demand, an hourly budget), each its own model with defaults, so
    existing files stay valid.
    """

    model_config = _CONFIG

    model: str = Field(strict=True)
    """Where the weights are: `s3://bucket/prefix`, or a local stoke checkpoint or Hugging Face
    directory."""
    resources: Resources = Field(default_factory=Resources)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    generation: Generation = Field(default_factory=Generation)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    slo: Slo = Field(default_factory=Slo)

    @field_validator("model")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError(
                "empty_model", "must not be empty; write s3://bucket/prefix or a local path"
            )
        return value.strip()

    def to_dict(self) -> dict[str, Any]:
        """The spec with the YAML key names (`keep_alive` in seconds, `memory` and `kv_cache` in
        bytes); `spec_from_dict(spec.to_dict()) == spec`."""
        return self.model_dump(mode="json", by_alias=True)


# -- loading ----------------------------------------------------------------------------------


def load_spec(
    text_or_path: str | Path | None = None,
    *,
    model: str | None = None,
    source_name: str = "spec",
) -> FunctionSpec:
    """Parse a spec from YAML text (a str) or a file (a Path); None means an empty file. `model`
    (the CLI's `--model`) replaces the file's `model`. Raises SpecError; when the spec came from
    a Path or `source_name` was given, each line starts with it (`policy.yaml: model: ...`)."""
    named = source_name != "spec"
    source: str | None = source_name if named else None
    if isinstance(text_or_path, Path):
        source = source_name if named else str(text_or_path)
        try:
            text = text_or_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"cannot read the spec file: {exc}", source=source) from None
    else:
        text = text_or_path or ""
    data = _parse_yaml(text, source)
    try:
        return spec_from_dict(data, model=model)
    except SpecError as exc:
        raise SpecError(list(exc.problems), source=source) from None


def _parse_yaml(text: str, source: str | None) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{where}invalid YAML: {problem}", source=source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(
            f"the top level is a {type(data).__name__}, not a mapping; write `key: value` lines "
            "such as `model: s3://bucket/prefix`",
            source=source,
        )
    return data


def spec_from_dict(data: dict[str, Any], *, model: str | None = None) -> FunctionSpec:
    """Validate a spec given as a mapping (a parsed YAML file or an HTTP JSON body). `model`
    replaces `data["model"]`. Raises SpecError with one line per problem."""
    if not isinstance(data, dict):
        raise SpecError(
            f"the spec is a {type(data).__name__}, not a mapping; give an object such as "
            '{"model": "s3://bucket/prefix"}'
        )
    if model is not None:
        data = {**data, "model": model}
    if data.get("model") is None:
        raise SpecError([MISSING_MODEL, *_problems_without_model(data)])
    try:
        return FunctionSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(describe(exc, FunctionSpec)) from None


def _problems_without_model(data: dict[str, Any]) -> list[str]:
    """The other problems in a spec that also lacks `model`, so one run reports them all."""
    try:
        FunctionSpec.model_validate({**data, "model": "placeholder"})
    except ValidationError as exc:
        return describe(exc, FunctionSpec)
    return []
