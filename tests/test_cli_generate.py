"""`stoke generate` as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from node_agent.engine import LLMEngine, Request, SamplingParams, TokenEvent, load_engine
from node_agent.facts.tokenizer import Tokenizer


def stoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stoke.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_json_reports_tokens_text_and_timings(tiny_model_dir: Path) -> None:
    result = stoke(
        "generate", str(tiny_model_dir), "Once upon a time", "--max-tokens", "12",
        "--temperature", "0", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    engine = load_engine(tiny_model_dir)
    prompt_ids = engine.tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=12, temperature=0.0)
    engine.add(engine.validate(Request("ref", tuple(prompt_ids), params)))
    expected = [e.token_id for e in _drain(engine) if e.token_id is not None]
    assert report["prompt_token_ids"] == prompt_ids
    assert report["token_ids"] == expected
    assert report["text"] == engine.tokenizer.decode(expected)
    assert report["finish_reason"] in ("length", "stop")
    assert report["load_ms"] > 0 and report["ttft_ms"] > 0 and report["tokens_per_s"] > 0


def test_generate_chat_wraps_the_prompt_in_the_models_chat_template(
    tiny_model_dir: Path,
) -> None:
    result = stoke(
        "generate", str(tiny_model_dir), "Hello", "--chat", "--max-tokens", "8", "--seed", "3",
        "--temperature", "0.7", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert "<|im_start|>assistant" in chat
    report = json.loads(result.stdout)
    assert report["prompt_token_ids"] == tokenizer.encode(chat, add_special_tokens=False)
    assert report["seed"] == 3


def test_generate_streams_text_to_stdout(tiny_model_dir: Path) -> None:
    result = stoke("generate", str(tiny_model_dir), "Hi", "--max-tokens", "12", "--seed", "0")
    report = stoke(
        "generate", str(tiny_model_dir), "Hi", "--max-tokens", "12", "--seed", "0", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == json.loads(report.stdout)["text"] + "\n"


def test_generate_rejects_a_directory_without_a_model(tmp_path: Path) -> None:
    result = stoke("generate", str(tmp_path), "hi")
    assert result.returncode == 2
    assert "config.json not found" in result.stderr and "Traceback" not in result.stderr


def test_generate_rejects_bad_sampling_parameters(tiny_model_dir: Path) -> None:
    result = stoke("generate", str(tiny_model_dir), "hi", "--top-p", "1.5")
    assert result.returncode == 2 and "top_p=1.5" in result.stderr


def _drain(engine: LLMEngine) -> list[TokenEvent]:
    events: list[TokenEvent] = []
    while engine.has_work():
        events.extend(engine.step())
    return events
