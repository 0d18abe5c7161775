"""controller.spec: the function spec file, its units and its error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.spec import (
    Autoscaling,
    FunctionSpec,
    SpecError,
    load_spec,
    spec_from_dict,
)

ISSUE_EXAMPLE = """\
model: s3://models/llama-3-8b     # or a local path: a stoke checkpoint or a Hugging Face directory
autoscaling:
  min_instances: 0
  max_instances: 4
  target_concurrency: 8           # in-flight requests per instance before scaling out
  keep_alive: 30s                 # idle time before scale-to-zero: 30s, 5m, or a number of seconds
"""


def spec_error(data: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_dict(data, **kwargs)
    return str(info.value)


# -- the file as written ----------------------------------------------------------------------


def test_the_issue_example_parses_to_its_values() -> None:
    spec = load_spec(ISSUE_EXAMPLE)
    assert spec.model == "s3://models/llama-3-8b"
    assert spec.autoscaling == Autoscaling(
        min_instances=0, max_instances=4, target_concurrency=8, keep_alive_s=30.0
    )
    assert spec.resources.memory_bytes is None


def test_defaults_fill_every_omitted_section() -> None:
    spec = load_spec("model: /models/tiny")
    assert spec.autoscaling.keep_alive_s == 300.0
    assert (spec.autoscaling.min_instances, spec.autoscaling.max_instances) == (0, 4)
    assert spec.autoscaling.target_concurrency == 8
    assert (spec.generation.max_tokens, spec.generation.temperature) == (256, 1.0)
    assert (spec.generation.top_p, spec.generation.max_tokens_limit) == (1.0, None)
    assert spec.engine.kv_cache_bytes is None and spec.engine.max_batch_size is None


def test_every_section_parses() -> None:
    spec = load_spec(
        """
model: ./ckpt
resources: {memory: 4GiB}
generation: {max_tokens: 64, temperature: 0.7, top_p: 0.9, max_tokens_limit: 1024}
engine: {kv_cache: 256MiB, max_batch_size: 16, max_model_len: 2048}
"""
    )
    assert spec.resources.memory_bytes == 4 << 30
    assert spec.generation.model_dump() == {
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens_limit": 1024,
    }
    assert spec.engine.kv_cache_bytes == 256 << 20
    assert (spec.engine.max_batch_size, spec.engine.max_model_len) == (16, 2048)


def test_spec_is_read_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(ISSUE_EXAMPLE)
    assert load_spec(path).autoscaling.keep_alive_s == 30.0


def test_errors_from_a_path_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("model: x\nautoscaling: {keep_alive: soon}\n")
    with pytest.raises(SpecError, match=r"policy\.yaml: autoscaling\.keep_alive: 'soon'"):
        load_spec(path)


def test_an_unreadable_path_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


# -- --model ----------------------------------------------------------------------------------


def test_model_argument_overrides_the_file() -> None:
    assert load_spec(ISSUE_EXAMPLE, model="/local/ckpt").model == "/local/ckpt"


def test_model_argument_alone_is_a_spec() -> None:
    spec = load_spec(None, model="s3://b/m")
    assert spec == FunctionSpec(model="s3://b/m")


def test_missing_model_says_how_to_give_it() -> None:
    with pytest.raises(SpecError) as info:
        load_spec("autoscaling: {max_instances: 2}")
    assert str(info.value) == "model: required; give it in the file or with --model"


def test_a_model_key_without_a_value_is_missing() -> None:
    with pytest.raises(SpecError) as info:
        load_spec("model:\n")
    assert str(info.value) == "model: required; give it in the file or with --model"


def test_missing_model_is_reported_with_the_other_problems() -> None:
    text = spec_error({"autoscaling": {"max_instances": 0}})
    assert text.splitlines()[0] == "model: required; give it in the file or with --model"
    assert "autoscaling.max_instances: 0 is too small; write a value >= 1" in text


@pytest.mark.parametrize("model", ["", "   "])
def test_empty_model_is_rejected(model: str) -> None:
    assert "model: must not be empty" in spec_error({"model": model})


def test_non_text_model_is_rejected() -> None:
    assert "model: 42 is not text" in spec_error({"model": 42})


# -- bad values: each names the dotted key and the fix ----------------------------------------


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            {"autoscaling": {"keep_alive": "30x"}},
            "autoscaling.keep_alive: '30x' is not a duration; "
            "write 30s, 5m, 1h or a number of seconds",
        ),
        ({"autoscaling": {"keep_alive": -1}}, "autoscaling.keep_alive: -1 is not a duration"),
        ({"autoscaling": {"min_instances": -1}}, "autoscaling.min_instances: -1 is too small"),
        ({"autoscaling": {"max_instances": 0}}, "write a value >= 1"),
        ({"autoscaling": {"target_concurrency": 0}}, "autoscaling.target_concurrency: 0"),
        ({"autoscaling": {"max_instances": "four"}}, "'four' is not a whole number"),
        ({"autoscaling": {"min_instances": "1"}}, "autoscaling.min_instances: '1' is not a whole"),
        ({"autoscaling": {"max_instances": 2.5}}, "autoscaling.max_instances: 2.5 is not a whole"),
        ({"autoscaling": {"max_instances": True}}, "autoscaling.max_instances: True is not a"),
        (
            {"autoscaling": {"min_instances": 3, "max_instances": 2}},
            "autoscaling.max_instances: 2 is below min_instances (3); "
            "raise max_instances to at least 3 or lower min_instances",
        ),
        (
            {"resources": {"memory": "4 gigs"}},
            "resources.memory: '4 gigs' is not a size; "
            "write 4GiB, 512MiB, 2GB or a number of bytes",
        ),
        ({"resources": {"memory": 0}}, "resources.memory: 0 is too small; write a value >= 1"),
        ({"generation": {"temperature": 2.5}}, "generation.temperature: 2.5 is too large"),
        ({"generation": {"temperature": -0.1}}, "generation.temperature: -0.1 is too small"),
        ({"generation": {"top_p": 0}}, "generation.top_p: 0 is too small; write a value > 0"),
        ({"generation": {"top_p": 1.5}}, "generation.top_p: 1.5 is too large; write a value <= 1"),
        ({"generation": {"top_p": "high"}}, "generation.top_p: 'high' is not a number"),
        ({"generation": {"max_tokens": 0}}, "generation.max_tokens: 0 is too small"),
        (
            {"generation": {"max_tokens": 512, "max_tokens_limit": 100}},
            "generation.max_tokens_limit: 100 is below max_tokens (512)",
        ),
        ({"engine": {"kv_cache": "lots"}}, "engine.kv_cache: 'lots' is not a size"),
        ({"engine": {"max_batch_size": 0}}, "engine.max_batch_size: 0 is too small"),
        ({"engine": {"max_model_len": -3}}, "engine.max_model_len: -3 is too small"),
        ({"autoscaling": 5}, "autoscaling: 5 is not a mapping; indent keys under it"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(section: dict[str, Any], expected: str) -> None:
    assert expected in spec_error({"model": "m", **section})


def test_unknown_key_lists_known_keys_and_suggests_a_close_match() -> None:
    text = spec_error({"model": "m", "autoscaling": {"max_instance": 3}})
    assert text == (
        "autoscaling.max_instance: unknown key; known keys here: min_instances, max_instances, "
        "target_concurrency, keep_alive, keep_alive_fallback; did you mean max_instances?"
    )


def test_unknown_top_level_key_without_a_close_match_has_no_suggestion() -> None:
    text = spec_error({"model": "m", "zzz": 1})
    assert text.startswith("zzz: unknown key; known keys here: model, resources, autoscaling")
    assert "did you mean" not in text


def test_unknown_keys_in_nested_sections_use_yaml_names() -> None:
    assert "did you mean kv_cache?" in spec_error({"model": "m", "engine": {"kvcache": 1}})
    assert "known keys here: memory" in spec_error({"model": "m", "resources": {"gpu": 1}})


def test_every_problem_gets_its_own_line() -> None:
    lines = spec_error(
        {"model": "m", "autoscaling": {"keep_alive": "x", "max_instance": 1}, "typo": 1}
    ).splitlines()
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {
        "autoscaling.keep_alive",
        "autoscaling.max_instance",
        "typo",
    }


def test_spec_error_is_a_value_error_with_problems() -> None:
    with pytest.raises(ValueError) as info:
        spec_from_dict({"model": "m", "a": 1, "b": 2})
    assert isinstance(info.value, SpecError)
    assert len(info.value.problems) == 2


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(SpecError, match=r"line 3, column \d+: invalid YAML"):
        load_spec("model: m\nautoscaling:\n  keep_alive: 30s: 5\n")


@pytest.mark.parametrize("text", ["- model: m", "just text", "42"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    with pytest.raises(SpecError, match="not a mapping"):
        load_spec(text)


def test_a_non_mapping_body_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="not a mapping"):
        spec_from_dict(["model"])  # type: ignore[arg-type]


def test_named_source_prefixes_every_line() -> None:
    with pytest.raises(SpecError) as info:
        load_spec("model: m\nbad: 1\nworse: 2", source_name="policy.yaml")
    assert all(line.startswith("policy.yaml: ") for line in info.value.problems)


# -- units ------------------------------------------------------------------------------------


def test_sizes_follow_the_same_rules_as_the_flags() -> None:
    spec = spec_from_dict(
        {"model": "s3://b/m", "resources": {"memory": "8G"}, "engine": {"kv_cache": "256 MiB"}}
    )
    assert spec.resources.memory_bytes == 8 << 30 and spec.engine.kv_cache_bytes == 256 << 20


# -- round trip -------------------------------------------------------------------------------


def test_to_dict_uses_yaml_names_and_round_trips() -> None:
    spec = load_spec(
        """
model: s3://b/m
resources: {memory: 4GiB}
autoscaling: {min_instances: 1, max_instances: 3, target_concurrency: 2, keep_alive: 5m}
generation: {max_tokens: 32, temperature: 0.0, top_p: 0.5, max_tokens_limit: 64}
engine: {kv_cache: 256MiB, max_batch_size: 8, max_model_len: 512}
"""
    )
    data = spec.to_dict()
    assert data["resources"] == {"memory": 4 << 30}
    assert data["autoscaling"]["keep_alive"] == 300.0
    assert data["engine"]["kv_cache"] == 256 << 20
    assert spec_from_dict(data) == spec


def test_default_spec_round_trips() -> None:
    spec = FunctionSpec(model="m")
    assert spec_from_dict(spec.to_dict()) == spec


# -- adaptive keep-alive and the SLO ----------------------------------------------------------


def test_keep_alive_adaptive_with_and_without_a_fallback() -> None:
    plain = spec_from_dict({"model": "m", "autoscaling": {"keep_alive": "adaptive"}}).autoscaling
    assert plain.adaptive and plain.fixed_keep_alive_s == 300.0
    given = load_spec("model: m\nautoscaling: {keep_alive: Adaptive, keep_alive_fallback: 10m}")
    assert given.autoscaling.adaptive and given.autoscaling.fixed_keep_alive_s == 600.0


def test_a_duration_keep_alive_is_not_adaptive() -> None:
    scale = load_spec("model: m\nautoscaling: {keep_alive: 90s}").autoscaling
    assert not scale.adaptive and scale.fixed_keep_alive_s == 90.0


def test_slo_ttft_p99_is_a_duration() -> None:
    assert load_spec("model: m\nslo: {ttft_p99: 2s}").slo.ttft_p99_s == 2.0
    assert load_spec("model: m\nslo: {ttft_p99: 0.5}").slo.ttft_p99_s == 0.5
    assert load_spec("model: m").slo.ttft_p99_s is None


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            {"autoscaling": {"keep_alive": "sometimes"}},
            "autoscaling.keep_alive: 'sometimes' is not a duration; write 30s, 5m, 1h or a number "
            "of seconds, or adaptive to learn it from the function's idle times",
        ),
        (
            {"autoscaling": {"keep_alive": "5m", "keep_alive_fallback": "10m"}},
            "autoscaling.keep_alive_fallback: only applies with keep_alive: adaptive; remove it, "
            "or set keep_alive: adaptive",
        ),
        (
            {"autoscaling": {"keep_alive": "adaptive", "keep_alive_fallback": "later"}},
            "autoscaling.keep_alive_fallback: 'later' is not a duration",
        ),
        (
            {"slo": {"ttft_p99": "fast"}},
            "slo.ttft_p99: 'fast' is not a duration; write 2s, 0.5s or a number of seconds",
        ),
        ({"slo": {"ttft_p99": "0s"}}, "slo.ttft_p99: '0s' is no time at all; write the time"),
        ({"slo": {"ttft_p99": -1}}, "slo.ttft_p99: -1 is not a duration"),
        ({"slo": {"ttft": 2}}, "slo.ttft: unknown key; known keys here: ttft_p99; did you mean"),
        ({"slo": "2s"}, "slo: '2s' is not a mapping; indent keys under it (known keys: ttft_p99)"),
    ],
)
def test_bad_adaptive_and_slo_values_name_the_key_and_the_fix(
    section: dict[str, Any], expected: str
) -> None:
    assert expected in spec_error({"model": "m", **section})


def test_adaptive_and_slo_round_trip() -> None:
    spec = load_spec(
        "model: m\nautoscaling: {keep_alive: adaptive, keep_alive_fallback: 2m}\n"
        "slo: {ttft_p99: 1.5s}\n"
    )
    data = spec.to_dict()
    assert data["autoscaling"]["keep_alive"] == "adaptive"
    assert data["autoscaling"]["keep_alive_fallback"] == 120.0
    assert data["slo"] == {"ttft_p99": 1.5}
    assert spec_from_dict(data) == spec
