"""OpenAI's request options through the official `openai` client against a real cluster
(controller + node agent processes): penalties, logit_bias and vLLM's extensions give the tokens
the in-process engine gives, log probabilities come in OpenAI's shapes (streamed and not) with
the engine's values, and every documented field is honoured, accepted or refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from cluster_fixtures import (
    INVOKE_KEY,
    Admin,
    free_port,
    generate_json,
    start_controller,
    start_node,
)
from engine_fixtures import run
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from controller.openai_fields import FIELDS, Endpoint, Support, markdown_table
from controller.schemas import ChatCompletionRequest, CompletionRequest
from node_agent.engine import LLMEngine, Request, SamplingParams, load_engine
from node_agent.engine.sequence import TokenEvent

PROMPT_IDS = [11, 42, 7, 300, 5, 5, 9, 42]
MAX_TOKENS = 12
README = Path(__file__).resolve().parent.parent / "README.md"

# Values exact in float32 (the node's wire type), so the cluster and the engine agree bit for bit.
# The random demo model rarely repeats a token; a bias toward three tokens makes the penalties
# (which act on repeats) change the output.
REPEATS = {"42": 3.0, "7": 3.0, "300": 3.0}
OPTIONS: dict[str, dict[str, Any]] = {
    "presence_penalty": {"presence_penalty": 1.5, "logit_bias": REPEATS},
    "frequency_penalty": {"frequency_penalty": 1.25, "logit_bias": REPEATS},
    # tokens not in the prompt: the penalty divides a repeat's positive logit, keeping the order
    # of tokens the prompt already has
    "repetition_penalty": {"repetition_penalty": 1.75, "logit_bias": {"500": 3.0, "501": 3.0}},
    "logit_bias": {"logit_bias": {"42": 4.0, "612": 2.5, "7": -100}},
    "min_tokens": {"min_tokens": 4, "logit_bias": {"2": 100}},
}
"""Each option under test (the key), with what makes it matter."""


# -- the documented fields --------------------------------------------------------------------


def documented(params: Any) -> set[str]:
    """The request fields the official client sends for an endpoint."""
    names = set(typing.get_type_hints(params.CompletionCreateParamsBase))
    return names | {"stream"}


@pytest.mark.parametrize(
    ("endpoint", "params"),
    [(Endpoint.COMPLETIONS, completion_create_params), (Endpoint.CHAT, chat_create_params)],
)
def test_every_field_the_openai_client_knows_is_in_the_table(
    endpoint: Endpoint, params: Any
) -> None:
    missing = sorted(
        f for f in documented(params) if endpoint not in FIELDS.get(f, _NOWHERE).endpoints
    )
    assert not missing, f"add these {endpoint} fields to controller/openai_fields.py: {missing}"


_NOWHERE = type("R", (), {"endpoints": frozenset()})()


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_the_request_models_declare_exactly_the_honoured_fields(model: Any) -> None:
    honoured = {
        name
        for name, rule in FIELDS.items()
        if rule.support is Support.HONOURED and model.endpoint in rule.endpoints
    }
    assert set(model.model_fields) == honoured


def test_the_readme_table_is_the_generated_one() -> None:
    assert markdown_table() in README.read_text(), (
        "README.md's field table is stale: paste `python -m controller.openai_fields` into it"
    )


# -- a cluster --------------------------------------------------------------------------------


class Cluster:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=INVOKE_KEY, max_retries=0)

    def invoke_json(self, prompt: str, *flags: str) -> dict[str, Any]:
        """`stoke invoke tiny PROMPT FLAGS --json` against this cluster, parsed."""
        env = {**os.environ, "STOKE_URL": self.url, "STOKE_API_KEY": INVOKE_KEY}
        out = subprocess.run(
            [sys.executable, "-m", "stoke.cli", "invoke", "tiny", prompt, *flags, "--json"],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def raw(self, path: str, body: dict[str, Any]) -> httpx.Response:
        headers = {"authorization": f"Bearer {INVOKE_KEY}"}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("options")
    port = free_port()
    controller, url = start_controller(tmp / "controller", port)
    node = start_node(tmp, "node-a", port)
    try:
        admin = Admin(url)
        admin.wait_for("the node", lambda: sum(n["alive"] for n in admin.nodes()) == 1)
        admin.deploy("tiny", {"model": str(tiny_model_dir)})
        yield Cluster(url)
    finally:
        node.stop()
        controller.stop()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    return load_engine(tiny_model_dir)


def engine_run(engine: LLMEngine, **params: Any) -> list[TokenEvent]:
    """The in-process engine's events for PROMPT_IDS: the reference."""
    full = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **params}
    return run(engine, Request("ref", tuple(PROMPT_IDS), SamplingParams(**full)))["ref"]


def engine_params(options: dict[str, Any]) -> dict[str, Any]:
    """The HTTP options as the engine's `SamplingParams` fields."""
    params = dict(options)
    if "logit_bias" in params:
        params["logit_bias"] = tuple(
            sorted((int(k), float(v)) for k, v in options["logit_bias"].items())
        )
    return params


def test_refused_fields_get_a_400_naming_them_and_accepted_ones_do_not(cluster: Cluster) -> None:
    bodies = {
        Endpoint.COMPLETIONS: (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "max_tokens": 2},
        ),
        Endpoint.CHAT: (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ),
    }
    for name, rule in FIELDS.items():
        for endpoint in rule.endpoints:
            path, body = bodies[endpoint]
            if rule.support is Support.REFUSED:
                refused = cluster.raw(path, {**body, name: {"asked": "for"}})
                assert refused.status_code == 400, (name, refused.text)
                assert refused.json()["error"]["param"] == name
                assert name in refused.json()["error"]["message"]
            elif rule.support is Support.ACCEPTED:
                accepted = cluster.raw(
                    path, {**body, name: "x" if name != "metadata" else {"a": "b"}}
                )
                assert accepted.status_code == 200, (name, accepted.text)
    neutral: dict[Endpoint, dict[str, Any]] = {
        Endpoint.COMPLETIONS: {"n": 1, "best_of": 1, "echo": False, "suffix": None},
        Endpoint.CHAT: {"n": 1, "tools": [], "tool_choice": "none", "modalities": ["text"]},
    }
    for endpoint, (path, body) in bodies.items():
        unknown = cluster.raw(path, {**body, "temprature": 0.5})
        assert unknown.status_code == 400 and "temprature" in unknown.json()["error"]["message"]
        asked_nothing = cluster.raw(path, {**body, **neutral[endpoint]})
        assert asked_nothing.status_code == 200, asked_nothing.text


@pytest.mark.parametrize("name", OPTIONS)
def test_penalties_and_biases_give_the_engines_tokens(
    cluster: Cluster, engine: LLMEngine, name: str
) -> None:
    options = OPTIONS[name]
    reference = engine_run(engine, **engine_params(options))
    without = engine_run(engine, **engine_params({k: v for k, v in options.items() if k != name}))
    expected = "".join(e.text for e in reference)
    assert [e.token_id for e in reference] != [e.token_id for e in without], "no effect"
    openai_keys = {"presence_penalty", "frequency_penalty", "logit_bias"}
    kwargs = {k: v for k, v in options.items() if k in openai_keys}
    extra = {k: v for k, v in options.items() if k not in openai_keys}
    common: dict[str, Any] = dict(
        model="tiny", prompt=PROMPT_IDS, max_tokens=MAX_TOKENS, temperature=0
    )
    whole = cluster.client.completions.create(**common, **kwargs, extra_body=extra)
    assert whole.choices[0].text == expected
    assert whole.usage is not None and whole.usage.completion_tokens == len(reference)
    streamed = cluster.client.completions.create(**common, **kwargs, extra_body=extra, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected


def test_ignore_eos_runs_to_max_tokens(cluster: Cluster) -> None:
    to_eos: dict[str, Any] = {
        "model": "tiny",
        "prompt": PROMPT_IDS,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    eager = cluster.client.completions.create(**to_eos, logit_bias={"2": 100})
    assert eager.choices[0].finish_reason == "stop" and eager.usage.completion_tokens == 1
    ignoring = cluster.client.completions.create(
        **to_eos, logit_bias={"2": 100}, extra_body={"ignore_eos": True}
    )
    assert ignoring.choices[0].finish_reason == "length"
    assert ignoring.usage.completion_tokens == MAX_TOKENS


def test_completion_logprobs_plain_and_streamed(cluster: Cluster, engine: LLMEngine) -> None:
    reference = engine_run(engine, logprobs=3, ignore_eos=True)
    common: dict[str, Any] = dict(
        model="tiny", prompt=PROMPT_IDS, max_tokens=MAX_TOKENS, temperature=0, logprobs=3
    )
    whole = cluster.client.completions.create(**common, extra_body={"ignore_eos": True})
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == whole.usage.completion_tokens == MAX_TOKENS
    tokenizer = engine.tokenizer
    for i, event in enumerate(reference):
        assert event.logprobs is not None and event.token_id is not None
        assert lp.tokens[i] == tokenizer.decode([event.token_id], skip_special_tokens=False)
        assert lp.token_logprobs[i] == pytest.approx(event.logprobs.logprob, abs=1e-6)
        top = {tokenizer.decode([t], skip_special_tokens=False): v for t, v in event.logprobs.top}
        assert lp.top_logprobs[i] == pytest.approx(top, abs=1e-6)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]

    streamed = list(
        cluster.client.completions.create(**common, extra_body={"ignore_eos": True}, stream=True)
    )
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [v for p in parts for v in p.token_logprobs] == lp.token_logprobs
    assert [o for p in parts for o in p.text_offset] == lp.text_offset


def test_chat_logprobs_plain_and_streamed(cluster: Cluster) -> None:
    common: dict[str, Any] = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Count with me"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
    )
    whole = cluster.client.chat.completions.create(**common)
    content = whole.choices[0].logprobs.content
    assert content is not None and len(content) == whole.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 4
        assert token.top_logprobs[0].logprob >= token.logprob - 1e-6
        assert token.top_logprobs[0].logprob >= token.top_logprobs[-1].logprob
        assert token.bytes == list(token.token.encode())
    assert all(t.logprob == max(x.logprob for x in t.top_logprobs) for t in content), "greedy"
    streamed = cluster.client.chat.completions.create(**common, stream=True)
    pieces = [
        token
        for chunk in streamed
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content
        for token in chunk.choices[0].logprobs.content
    ]
    assert [(t.token, t.logprob) for t in pieces] == [(t.token, t.logprob) for t in content]
    no_logprobs = cluster.client.chat.completions.create(
        **{**common, "logprobs": False, "top_logprobs": None}
    )
    assert no_logprobs.choices[0].logprobs is None


def test_stoke_invoke_and_stoke_generate_take_the_same_options(
    cluster: Cluster, tiny_model_dir: Path
) -> None:
    flags = ["--max-tokens", "10", "--temperature", "0", "--frequency-penalty", "1.5"]
    flags += ["--logit-bias", "42=3", "--logit-bias", "7=3", "--min-tokens", "3", "--logprobs", "2"]
    local = generate_json(tiny_model_dir, "Once upon a time", *flags)
    remote = cluster.invoke_json("Once upon a time", *flags)
    assert remote["text"] == local["text"]
    assert remote["logprobs"]["token_logprobs"] == pytest.approx(
        [t["logprob"] for t in local["logprobs"]], abs=1e-6
    )
    plain = generate_json(tiny_model_dir, "Once upon a time", *flags[:4])
    assert plain["token_ids"] != local["token_ids"], "the options changed nothing"


# -- several choices and the echoed prompt ----------------------------------------------------

SAMPLED: dict[str, Any] = dict(model="tiny", prompt=PROMPT_IDS, max_tokens=MAX_TOKENS,
                               temperature=0.9, extra_body={"ignore_eos": True})  # fmt: skip


def test_n_choices_equal_single_requests_with_consecutive_seeds(cluster: Cluster) -> None:
    """Choice i of `n` samples as a request of its own with seed + i; usage counts the prompt
    once and every choice's tokens; streamed, each choice's chunks carry its index."""
    whole = cluster.client.completions.create(**SAMPLED, n=3, seed=40)
    singles = [cluster.client.completions.create(**SAMPLED, seed=40 + i) for i in range(3)]
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.text for c in whole.choices] == [s.choices[0].text for s in singles]
    assert len({c.text for c in whole.choices}) > 1, "the choices differ"
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == len(PROMPT_IDS)
    assert whole.usage.completion_tokens == 3 * MAX_TOKENS

    chunks = list(
        cluster.client.completions.create(
            **SAMPLED, n=3, seed=40, stream=True, stream_options={"include_usage": True}
        )
    )
    texts = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3 * MAX_TOKENS


def test_chat_n_choices_plain_and_streamed(cluster: Cluster) -> None:
    common: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "Count with me"}],
        max_tokens=MAX_TOKENS, temperature=0.9, seed=3,
    )  # fmt: skip
    whole = cluster.client.chat.completions.create(**common, n=2)
    second = cluster.client.chat.completions.create(**{**common, "seed": 4})
    assert whole.choices[1].message.content == second.choices[0].message.content
    texts = ["", ""]
    for chunk in cluster.client.chat.completions.create(**common, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]


def test_best_of_returns_the_n_most_likely_of_its_generations(cluster: Cluster) -> None:
    """best_of=4, n=2: the two returned are the two of the four generations (seeds 70..73)
    with the highest cumulative log probability, best first, without log probabilities
    (not asked for); usage counts all four."""
    best = cluster.client.completions.create(**SAMPLED, n=2, best_of=4, seed=70)
    singles = [
        cluster.client.completions.create(**SAMPLED, seed=70 + i, logprobs=0) for i in range(4)
    ]
    totals = [(sum(s.choices[0].logprobs.token_logprobs), s.choices[0].text) for s in singles]
    ranked = [text for _, text in sorted(totals, reverse=True)]
    assert [c.text for c in best.choices] == ranked[:2]
    assert all(c.logprobs is None for c in best.choices)
    assert best.usage is not None and best.usage.completion_tokens == 4 * MAX_TOKENS


def test_echo_puts_the_prompt_and_its_logprobs_first(cluster: Cluster, engine: LLMEngine) -> None:
    prompt = "Once upon a time"
    common: dict[str, Any] = dict(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    plain = cluster.client.completions.create(**common)
    echoed = cluster.client.completions.create(**common, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text

    scored = cluster.client.completions.create(**common, echo=True, logprobs=2, n=2)
    prompt_ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
    reference = run(engine, Request("echo", tuple(prompt_ids), params))["echo"][0].prompt_logprobs
    for choice in scored.choices:
        assert choice.text == prompt + plain.choices[0].text
        lp = choice.logprobs
        assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
        assert len(lp.tokens or []) == len(prompt_ids) + MAX_TOKENS
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1 : len(prompt_ids)] == pytest.approx(
            [r.logprob for r in reference], abs=1e-6
        )
        assert [len(t) for t in lp.top_logprobs[1:]] == [2] * (len(lp.tokens or []) - 1)

    streamed = list(cluster.client.completions.create(**common, echo=True, logprobs=2, stream=True))
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert "".join(c.choices[0].text for c in streamed if c.choices) == scored.choices[0].text
    whole = scored.choices[0].logprobs
    assert whole is not None and whole.token_logprobs is not None
    # n=2 decoded its choices in one batch: the same math, rounded a little differently
    assert [v for p in parts for v in p.token_logprobs or []] == pytest.approx(
        whole.token_logprobs, abs=1e-5
    )


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"n": 2, "best_of": 1}, "best_of (1) must be at least n (2)"),
        ({"best_of": 3, "stream": True}, "best_of over n cannot be streamed"),
        ({"n": 17}, "less than or equal to 16"),
    ],
)
def test_bad_choice_counts_are_400s_that_say_why(
    cluster: Cluster, body: dict[str, Any], words: str
) -> None:
    refused = cluster.raw("/v1/completions", {"model": "tiny", "prompt": "hi", **body})
    assert refused.status_code == 400, refused.text
    assert words in refused.json()["error"]["message"]


def test_stoke_invoke_and_stoke_generate_give_the_same_choices(
    cluster: Cluster, tiny_model_dir: Path
) -> None:
    flags = ["--max-tokens", "8", "--temperature", "0.9", "--seed", "21", "--ignore-eos"]
    flags += ["--n", "2", "--best-of", "3", "--echo"]
    local = generate_json(tiny_model_dir, "Once upon a time", *flags)
    remote = cluster.invoke_json("Once upon a time", *flags)
    assert [c["text"] for c in remote["choices"]] == [c["text"] for c in local["choices"]]
    assert all(c["text"].startswith("Once upon a time") for c in local["choices"])
    assert remote["usage"]["completion_tokens"] == 3 * 8


# -- structured output ------------------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "sizes": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 3},
    },
    "required": ["ok", "colour", "sizes"],
    "additionalProperties": False,
}


def test_json_schema_output_plain_and_streamed(cluster: Cluster) -> None:
    import jsonschema

    common: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "Describe a ball"}], max_tokens=120,
        temperature=0.9, seed=8,
        response_format={"type": "json_schema", "json_schema": {"name": "ball", "schema": SCHEMA}},
    )  # fmt: skip
    whole = cluster.client.chat.completions.create(**common)
    text = whole.choices[0].message.content or ""
    jsonschema.validate(json.loads(text), SCHEMA)
    assert whole.choices[0].finish_reason == "stop"
    streamed = cluster.client.chat.completions.create(**common, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    free = cluster.client.chat.completions.create(**{**common, "response_format": {"type": "text"}})
    assert free.choices[0].message.content != text


@pytest.mark.parametrize(
    ("response_format", "words"),
    [
        ({"type": "regex"}, "response_format.type='regex' is not supported"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
            "cannot be enforced: Invalid type: nonsense",
        ),
    ],
)
def test_a_format_stoke_cannot_enforce_is_a_400_naming_it(
    cluster: Cluster, response_format: dict[str, Any], words: str
) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "response_format": response_format}  # fmt: skip
    refused = cluster.raw("/v1/chat/completions", body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "response_format"
    assert words in refused.json()["error"]["message"]


def test_stoke_invoke_and_stoke_generate_take_a_response_format(
    cluster: Cluster, tiny_model_dir: Path
) -> None:
    import jsonschema

    fmt = json.dumps({"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    flags = ["--chat", "--max-tokens", "120", "--temperature", "0.9", "--seed", "8"]
    flags += ["--response-format", fmt]
    local = generate_json(tiny_model_dir, "Describe a ball", *flags)
    remote = cluster.invoke_json("Describe a ball", *flags)
    assert remote["text"] == local["text"]
    jsonschema.validate(json.loads(local["text"]), SCHEMA)
