"""GGUF import on small GGUF files written here with the `gguf` library, the way llama.cpp writes
them (Q/K rows permuted for Llama, weights quantized in blocks, a byte-level BPE tokenizer and a
chat template in the metadata): every supported type dequantizes to exactly what `transformers`
reads from the same file, Q/K come back in Hugging Face order, greedy ids and prompt ids match
`transformers`, and every kind of bad file is refused by name with nothing left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from checkpoint_format import is_checkpoint
from checkpoint_format.from_gguf import SUPPORTED_TYPES, GGUFError, convert_gguf
from checkpoint_format.from_gguf.tokenizer import _byte_alphabet
from loader import load_state_dict

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "o n", "e r", "Ġ s", "a n", "Ġ w"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def vocabulary() -> tuple[list[str], list[int]]:
    """Specials (control), the 256 byte characters, then one token per merge (normal)."""
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = [*SPECIALS, *_byte_alphabet().values(), *merged]
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of Q/K rows (the inverse of stoke's)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def hf_weights(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights by GGUF name, in Hugging Face row order (not yet permuted)."""
    rng = np.random.default_rng(seed)
    vocab = len(vocabulary()[0])

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    q_rows = HEADS * HEAD_DIM
    kv_rows = KV_HEADS * HEAD_DIM
    w = {"token_embd.weight": mat(vocab, HIDDEN), "output_norm.weight": norm(HIDDEN)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        w |= {
            b + "attn_norm.weight": norm(HIDDEN),
            b + "ffn_norm.weight": norm(HIDDEN),
            b + "attn_q.weight": mat(q_rows, HIDDEN),
            b + "attn_k.weight": mat(kv_rows, HIDDEN),
            b + "attn_v.weight": mat(kv_rows, HIDDEN),
            b + "attn_output.weight": mat(HIDDEN, q_rows),
            b + "ffn_gate.weight": mat(FFN, HIDDEN),
            b + "ffn_up.weight": mat(FFN, HIDDEN),
            b + "ffn_down.weight": mat(HIDDEN, FFN),
        }
        if arch == "qwen2":
            for part, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                w[b + f"attn_{part}.bias"] = (0.1 * rng.standard_normal(rows)).astype(np.float32)
        if arch == "qwen3":
            w[b + "attn_q_norm.weight"] = norm(HEAD_DIM)
            w[b + "attn_k_norm.weight"] = norm(HEAD_DIM)
    return w


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    qtype: str = "Q8_0",
    tokenizer_model: str = "gpt2",
    weights: dict[str, np.ndarray] | None = None,
    raw: dict[str, tuple[np.ndarray, str]] | None = None,
) -> Path:
    """A GGUF as llama.cpp writes one: 2-D weights in `qtype`, norms and biases in F32.

    `raw`: extra tensors given as already-encoded bytes of a named type (to write types the
    `gguf` library cannot quantize)."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    tokens, types = vocabulary()
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    if arch == "qwen3":
        writer.add_key_length(HEAD_DIM)
        writer.add_value_length(HEAD_DIM)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    kind = GGMLQuantizationType[qtype]
    for name, array in (weights if weights is not None else hf_weights(arch)).items():
        if arch == "llama" and ".attn_q." in name:
            array = permute(array, HEADS)
        elif arch == "llama" and ".attn_k." in name:
            array = permute(array, KV_HEADS)
        if array.ndim == 2 and kind != GGMLQuantizationType.F32:
            writer.add_tensor(name, quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)
    for name, (data, type_name) in (raw or {}).items():
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference(gguf: Path) -> Any:
    """`transformers` reading the same GGUF (its own dequantizer and un-permutation)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()


def convert(gguf: Path, out: Path) -> Path:
    convert_gguf(gguf, out, progress=False, fsync=False)
    return out


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES)
def test_each_type_dequantizes_to_what_transformers_reads(tmp_path: Path, qtype: str) -> None:
    gguf = write_gguf(tmp_path / f"m-{qtype}.gguf", qtype=qtype)
    ours = load_state_dict(convert(gguf, tmp_path / "ckpt"))
    theirs = reference(gguf).state_dict()
    assert set(theirs) == set(ours) | {"lm_head.weight"}  # tied: the head is the embedding
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_float_weights_come_back_in_hugging_face_order(tmp_path: Path, arch: str) -> None:
    """F32 is exact, so the checkpoint must hold the very arrays written (Q/K un-permuted)."""
    weights = hf_weights(arch, seed=1)
    ours = load_state_dict(convert(write_gguf(tmp_path / "m.gguf", arch=arch, qtype="F32",
                                              weights=weights), tmp_path / "ckpt"))  # fmt: skip
    assert ours["model.layers.1.self_attn.q_proj.weight"].numpy().tobytes() == (
        weights["blk.1.attn_q.weight"].tobytes()
    )
    assert ours["model.layers.0.self_attn.k_proj.weight"].numpy().tobytes() == (
        weights["blk.0.attn_k.weight"].tobytes()
    )
    assert len(ours) == len(weights) + 1  # and lm_head, tied to the embedding


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("gguf-tiny")
    gguf = write_gguf(tmp / "tiny.gguf", qtype="Q4_1")
    return gguf, convert(gguf, tmp / "ckpt")


def test_greedy_ids_equal_transformers(tiny: tuple[Path, Path]) -> None:
    from node_agent.engine import Request, SamplingParams, load_engine

    gguf, ckpt = tiny
    engine = load_engine(ckpt, "cpu")
    prompt = engine.tokenizer.encode("the wind in the willows", add_special_tokens=False)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    engine.add(engine.validate(Request("r", tuple(prompt), params)))
    got = [e.token_id for _ in range(64) if engine.has_work() for e in engine.step()]
    want = reference(gguf).generate(
        torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None
    )[0, len(prompt) :]
    assert got == want.tolist()


@pytest.mark.parametrize("text", ["the theater", "  héllo\n\nthe 42 ways 🙂", "<|im_end|>x"])
def test_tokenizer_and_chat_template_equal_transformers(tiny: tuple[Path, Path], text: str) -> None:
    from transformers import AutoTokenizer

    from node_agent.facts.tokenizer import Tokenizer

    gguf, ckpt = tiny
    ours = Tokenizer.from_dir(ckpt)
    theirs = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    messages = [{"role": "user", "content": text}]
    want: Any = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want  # a BatchEncoding in v5
    chat = ours.encode(ours.apply_chat_template(messages), add_special_tokens=False)
    assert chat == list(want)
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert 2 in ours.eos_token_ids


# -- refusals: each names the problem and leaves no output directory ----------------------------


def refused(gguf: Path, out: Path, match: str) -> None:
    with pytest.raises(GGUFError, match=match):
        convert_gguf(gguf, out, progress=False)
    assert not out.exists()


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "m.gguf")
    data = gguf.read_bytes()
    gguf.write_bytes(data[: len(data) - 3000])
    refused(gguf, tmp_path / "out", "truncated or corrupt")


def test_file_cut_inside_its_header_is_refused(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "m.gguf")
    gguf.write_bytes(gguf.read_bytes()[:300])
    refused(gguf, tmp_path / "out", "truncated or corrupt")


def test_corrupt_metadata_is_refused(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "m.gguf")
    data = bytearray(gguf.read_bytes())
    data[16:24] = (2**62).to_bytes(8, "little")  # the metadata entry count
    gguf.write_bytes(bytes(data))
    refused(gguf, tmp_path / "out", "truncated or corrupt")


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip, not a model")
    refused(path, tmp_path / "out", "not a GGUF file")


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "m.gguf", arch="falcon")
    refused(gguf, tmp_path / "out", "architecture 'falcon' is not one stoke's engine runs")


def test_unsupported_tokenizer_is_refused(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "m.gguf", tokenizer_model="llama")
    refused(gguf, tmp_path / "out", "tokenizer model 'llama'")


def test_unsupported_quantization_is_refused(tmp_path: Path) -> None:
    iq4 = np.zeros((FFN, 18 * HIDDEN // 32), np.uint8)  # IQ4_NL: 18 bytes per 32 weights
    weights = hf_weights("llama")
    del weights["blk.0.ffn_up.weight"]
    gguf = write_gguf(
        tmp_path / "m.gguf", weights=weights, raw={"blk.0.ffn_up.weight": (iq4, "IQ4_NL")}
    )
    refused(gguf, tmp_path / "out", "'blk.0.ffn_up.weight' is stored as IQ4_NL")


def test_cli_reports_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "m.gguf", tokenizer_model="t5")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "stoke.cli", "convert", str(gguf), str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert "tokenizer model 't5'" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_cli_converts_a_gguf(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "m.gguf", qtype="Q4_0")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "stoke.cli", "convert", str(gguf), str(out), "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert is_checkpoint(out)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }


# -- a .gguf given where a model directory is expected (deploy, generate) -------------------------


def test_model_path_converts_once_and_reconverts_a_replaced_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stoke.gguf_cache import model_path

    monkeypatch.setenv("STOKE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = write_gguf(tmp_path / "m.gguf", qtype="Q8_0")
    first = model_path(str(gguf), progress=False)
    assert is_checkpoint(first) and "converting" in capsys.readouterr().err
    assert model_path(str(gguf), progress=False) == first
    assert "converting" not in capsys.readouterr().err  # the cached checkpoint, as is
    write_gguf(gguf, qtype="Q4_0")  # replaced: another size, another fingerprint
    second = model_path(str(gguf), progress=False)
    assert second != first and is_checkpoint(second)
    assert model_path(str(tmp_path)) == str(tmp_path)  # a directory passes through


def test_model_path_leaves_nothing_for_a_bad_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stoke.gguf_cache import model_path

    cache = tmp_path / "cache"
    monkeypatch.setenv("STOKE_CACHE_DIR", str(cache))
    gguf = write_gguf(tmp_path / "m.gguf", arch="falcon")
    with pytest.raises(GGUFError, match="falcon"):
        model_path(str(gguf), progress=False)
    assert not any(cache.rglob("*"))  # no checkpoint, no partial directory
