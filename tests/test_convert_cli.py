"""`stoke convert` and `stoke verify` as real subprocesses, and `convert_hf` on bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import checkpoint_format as cf
from loader import load_state_dict

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True, "vocab_size": 64}


def hf_weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    return {
        "model.embed_tokens.weight": rand(64, 32),
        "model.layers.0.mlp.up_proj.weight": rand(96, 32),
        "model.layers.0.input_layernorm.weight": rand(32),
        "model.norm.weight": rand(32),
    }


def make_hf_dir(path: Path, *, sharded: bool = True, **config: object) -> Path:
    """A two-shard (or single-file) Hugging Face directory with config and tokenizer files."""
    path.mkdir(parents=True)
    weights = hf_weights()
    (path / "config.json").write_text(json.dumps(CONFIG | config))
    (path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    if not sharded:
        save_file(weights, path / "model.safetensors")
        return path
    names = list(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, path / file)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def stoke(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "stoke.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_convert_verify_and_load(tmp_path: Path) -> None:
    hf = make_hf_dir(tmp_path / "hf")
    out = tmp_path / "ckpt"
    done = stoke("convert", str(hf), str(out), "--dtype", "float32", "--chunk-size", "4096")
    assert done.returncode == 0, done.stderr
    assert "4 tensors (+1 tied)" in done.stdout
    checked = stoke("verify", str(out))
    assert checked.returncode == 0 and "ok" in checked.stdout, checked.stderr
    got = load_state_dict(out)
    for name, want in hf_weights().items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want.float()), name
    assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()
    assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert cf.read_config(out) == CONFIG


def test_verify_names_the_flipped_chunk(tmp_path: Path) -> None:
    hf = make_hf_dir(tmp_path / "hf", sharded=False)
    out = tmp_path / "ckpt"
    assert stoke("convert", str(hf), str(out), "--chunk-size", "4096").returncode == 0
    entry = cf.read_manifest(out).tensors["model.layers.0.mlp.up_proj.weight"]
    target = entry.offset + 4096 + 17  # inside the 2nd chunk of that tensor
    data = bytearray((out / "partition-00000.bin").read_bytes())
    data[target] ^= 0xFF
    (out / "partition-00000.bin").write_bytes(bytes(data))
    chunk = target // 4096
    bad = stoke("verify", str(out))
    assert bad.returncode == 2
    assert f"partition-00000.bin: chunk {chunk} (bytes {chunk * 4096}..{chunk * 4096 + 4096})" in (
        bad.stderr
    )
    report = json.loads(stoke("verify", str(out), "--json").stdout)
    assert [(b["file"], b["index"]) for b in report["bad"]] == [("partition-00000.bin", chunk)]


def test_convert_refuses_a_non_empty_output(tmp_path: Path) -> None:
    hf = make_hf_dir(tmp_path / "hf")
    done = stoke("convert", str(hf), str(hf))
    assert done.returncode == 2 and "not an empty directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_transformers_model_round_trips(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "hf")
    cf.convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    got = load_state_dict(tmp_path / "ckpt")
    want = model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"\x80\x04not-loaded")
    with pytest.raises(cf.ConversionError, match="pickle weights"):
        cf.convert_hf(tmp_path / "hf", tmp_path / "ckpt")


def test_index_that_escapes_the_directory_is_refused(tmp_path: Path) -> None:
    hf = make_hf_dir(tmp_path / "hf")
    index = {"weight_map": {"model.norm.weight": "../../secret.safetensors"}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(cf.UnsafeNameError, match="secret"):
        cf.convert_hf(hf, tmp_path / "ckpt")


def test_index_listing_a_missing_tensor_is_refused(tmp_path: Path) -> None:
    hf = make_hf_dir(tmp_path / "hf")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.ghost.weight"] = "model-00002-of-00002.safetensors"
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(cf.ConversionError, match="incomplete"):
        cf.convert_hf(hf, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_truncated_shard_is_a_conversion_error(tmp_path: Path) -> None:
    hf = make_hf_dir(tmp_path / "hf", sharded=False)
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(cf.ConversionError, match=r"model\.safetensors"):
        cf.convert_hf(hf, tmp_path / "ckpt")


def test_verify_json_reports_structural_damage_as_json(tmp_path: Path) -> None:
    hf = make_hf_dir(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    assert stoke("convert", str(hf), str(ckpt)).returncode == 0
    partition = ckpt / "partition-00000.bin"
    partition.write_bytes(partition.read_bytes()[:4096])
    result = stoke("verify", str(ckpt), "--json")
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["error_type"] == "TruncatedPartitionError"
