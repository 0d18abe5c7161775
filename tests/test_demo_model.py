"""stoke demo-model: HF layout that transformers loads, deterministic bytes, sizes, sharding."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from stoke.commands.demo_model import register
from stoke.demo_model import make_demo_model
from stoke.demo_spec import ARCHS, build_config, count_parameters
from stoke.demo_tokenizer import demo_tokenizer_json, trained_tokenizer_json
from stoke.errors import StokeError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def build(out: Path, **overrides: Any) -> Path:
    """A tiny llama demo model in `out`, with make_demo_model keyword overrides."""
    return make_demo_model(out, **{"size": "tiny", "arch": "llama", "seed": 0, **overrides})


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def file_bytes(model_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(model_dir.iterdir())}


@pytest.fixture(scope="module", params=ARCHS)
def hf_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(arch, model dir, transformers model, loading info) for each architecture."""
    model_dir = build(tmp_path_factory.mktemp(request.param), arch=request.param)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, output_loading_info=True
    )
    return request.param, model_dir, model.eval(), info


def test_transformers_loads_every_weight(hf_model: Any) -> None:
    _, _, _, info = hf_model
    assert {key: value for key, value in info.items() if value} == {}


def test_transformers_builds_the_named_architecture(hf_model: Any) -> None:
    arch, _, model, _ = hf_model
    expected = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "mistral": "MistralForCausalLM",
    }
    assert type(model).__name__ == expected[arch]


def test_transformers_forward_gives_finite_logits_over_the_vocab(hf_model: Any) -> None:
    _, _, model, _ = hf_model
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_greedy_generation_is_varied(hf_model: Any) -> None:
    _, _, model, _ = hf_model
    ids = [100, 200, 300]
    with torch.no_grad():
        for _ in range(16):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert len(set(ids[3:])) >= 13


def test_qwen2_has_qkv_biases_but_no_o_proj_bias(tmp_path: Path) -> None:
    names = set(weights(build(tmp_path, arch="qwen2")))
    assert {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} <= names
    assert "model.layers.0.self_attn.o_proj.bias" not in names


def test_qwen3_has_qk_norms_of_its_explicit_head_dim(tmp_path: Path) -> None:
    model_dir = build(tmp_path, arch="qwen3")
    config = json.loads((model_dir / "config.json").read_text())
    tensors = weights(model_dir)
    assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
    assert tensors["model.layers.0.self_attn.q_norm.weight"].shape == (config["head_dim"],)
    assert torch.equal(tensors["model.layers.0.self_attn.k_norm.weight"], torch.ones(32))


def test_sharded_layout_holds_the_same_tensors(tmp_path: Path) -> None:
    single = weights(build(tmp_path / "single"))
    sharded_dir = build(tmp_path / "sharded", shard_bytes=200_000)
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded_dir / "model.safetensors").exists()
    sharded = weights(sharded_dir)
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[name], single[name]) for name in single)


def test_transformers_loads_sharded_layout(tmp_path: Path) -> None:
    model_dir = build(tmp_path, shard_bytes=200_000)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    assert file_bytes(build(tmp_path / "a", seed=3)) == file_bytes(build(tmp_path / "b", seed=3))


def test_another_process_writes_the_same_bytes(tmp_path: Path) -> None:
    code = "import sys; from stoke.demo_model import make_demo_model; make_demo_model(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], check=True, env=env)
    assert file_bytes(tmp_path / "a") == file_bytes(build(tmp_path / "b"))


def test_different_seed_gives_different_weights(tmp_path: Path) -> None:
    a, b = weights(build(tmp_path / "a", seed=0)), weights(build(tmp_path / "b", seed=1))
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_tokenizer_training_is_deterministic() -> None:
    first = trained_tokenizer_json(1000)
    trained_tokenizer_json.cache_clear()
    assert trained_tokenizer_json(1000) == first


def test_vocab_size_is_the_tokenizer_size_padded_to_64(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert config["vocab_size"] == tokenizer.get_vocab_size() == 1024
    assert tokenizer.token_to_id("<|reserved_0|>") is not None


def test_every_id_decodes(tiny_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert all(tokenizer.decode([i], skip_special_tokens=False) for i in range(vocab))


def test_transformers_tokenizer_encodes_like_tokenizers(tiny_model_dir: Path) -> None:
    text = "Hello wörld! 你好 🙂 <|im_start|>user\nhi<|im_end|> done"
    hf = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    backend = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert hf(text)["input_ids"] == backend.encode(text).ids


def test_generation_config_stops_on_chat_end_and_endoftext(tiny_model_dir: Path) -> None:
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    ends = {tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")}
    assert set(generation["eos_token_id"]) == ends


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("size", "low", "high"), [("small", 85e6, 115e6), ("1b", 1.0e9, 1.1e9)])
def test_size_has_its_advertised_parameter_count(
    arch: str, size: str, low: float, high: float
) -> None:
    ids = {"bos": 0, "eos": 2, "pad": 0}
    config = build_config(size, arch, vocab_size=4032, dtype="float32", special_ids=ids)
    assert low <= count_parameters(config) <= high


def test_bfloat16_model_is_the_float32_model_rounded(tmp_path: Path) -> None:
    full = weights(build(tmp_path / "f32"))
    half_dir = build(tmp_path / "bf16", dtype="bfloat16")
    half = weights(half_dir)
    assert json.loads((half_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(torch.equal(half[name], full[name].to(torch.bfloat16)) for name in full)


def test_config_overrides_shape_the_weights(tmp_path: Path) -> None:
    names = set(weights(build(tmp_path, config_overrides={"num_hidden_layers": 1})))
    assert "model.layers.0.mlp.up_proj.weight" in names
    assert not any(name.startswith("model.layers.1.") for name in names)


def test_tied_embeddings_override_drops_lm_head(tmp_path: Path) -> None:
    names = set(weights(build(tmp_path, config_overrides={"tie_word_embeddings": True})))
    assert "lm_head.weight" not in names


def test_vocab_override_below_tokenizer_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StokeError, match="vocab_size=512"):
        build(tmp_path, config_overrides={"vocab_size": 512})


def test_vocab_override_pads_tokenizer_to_match(tmp_path: Path) -> None:
    model_dir = build(tmp_path, config_overrides={"vocab_size": 1280})
    assert Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size() == 1280
    assert demo_tokenizer_json(1000, 1280) == (model_dir / "tokenizer.json").read_text()


def test_non_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StokeError, match="--force"):
        build(tmp_path)


def test_force_writes_model_and_keeps_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    build(tmp_path, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "model.safetensors").is_file()


def test_previous_demo_model_is_replaced_without_stale_shards(tmp_path: Path) -> None:
    build(tmp_path, shard_bytes=200_000)
    build(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_unknown_arch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StokeError, match="qwen3"):
        build(tmp_path, arch="gpt2")


def cli(*argv: str) -> int:
    """Run `stoke demo-model ARGV` through its own parser (independent of other commands)."""
    parser = argparse.ArgumentParser(prog="stoke")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo-model", *argv])
    return int(args.func(args))


def test_cli_reports_path_and_parameter_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(str(tmp_path / "m"), "--arch", "mistral", "--seed", "4") == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "m") in out and "parameters" in out and "mistral" in out


def test_cli_json_reports_the_exact_parameter_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli(str(tmp_path / "m"), "--json")
    report = json.loads(capsys.readouterr().out)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert report["parameters"] == count_parameters(config)


def test_cli_rejects_unknown_size(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cli(str(tmp_path / "m"), "--size", "huge")


def test_registering_the_command_does_not_import_torch() -> None:
    code = "import sys, stoke.commands.demo_model; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_demo_model_refuses_to_overwrite_a_stoke_checkpoint(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from checkpoint_format import convert_hf

    ckpt = tmp_path / "ckpt"
    convert_hf(tiny_model_dir, ckpt)
    with pytest.raises(StokeError, match="holds a stoke checkpoint"):
        make_demo_model(ckpt, size="tiny", force=True)
