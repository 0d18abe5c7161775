"""GGUF tensors -> Hugging Face-named float tensors: names mapped, blocks dequantized, Q/K rows
put back in Hugging Face order.

llama.cpp's converter renames every tensor (`blk.3.attn_q.weight`), quantizes most of them in
blocks, and for Llama permutes the rows of the Q and K projections so its rotary kernel can work
on adjacent pairs. Each step is undone here, one tensor at a time, so memory stays at about the
largest tensor in float32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from checkpoint_format.from_gguf.read import GGUFError, GGUFFile

if TYPE_CHECKING:
    from gguf import ReaderTensor

# Block formats this converter dequantizes (with gguf's reference numpy code) and the plain float
# ones. Others (the IQ*/TQ* families, MXFP4, ...) are refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


@dataclass(frozen=True)
class SourceTensor:
    """One GGUF tensor and the Hugging Face name and shape it becomes."""

    hf_name: str
    shape: tuple[int, ...]
    tensor: ReaderTensor


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for one the engine does not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def plan_tensors(gguf: GGUFFile) -> list[SourceTensor]:
    """Every tensor to convert, checked: known name, supported type. Raises `GGUFError`."""
    planned = []
    for tensor in gguf.reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise GGUFError(
                f"{gguf.path}: tensor {tensor.name!r} has no place in stoke's "
                f"{gguf.architecture} decoder (e.g. rope_freqs for long-context rope scaling); "
                "this GGUF describes a model variant the converter does not map."
            )
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{gguf.path}: tensor {tensor.name!r} is stored as {kind}, which stoke cannot "
                f"dequantize (supported: {', '.join(SUPPORTED_TYPES)}). Use a GGUF quantized to "
                "one of those (e.g. Q8_0 or Q4_0), or the model's Hugging Face directory."
            )
        # GGUF lists dimensions innermost first; PyTorch outermost first.
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        planned.append(SourceTensor(name, shape, tensor))
    return planned


def dequantized(source: SourceTensor, *, heads: int, kv_heads: int, permuted_qk: bool) -> Any:
    """The tensor as a float32 numpy array of its Hugging Face shape, Q/K rows un-permuted."""
    from gguf import dequantize

    array = np.asarray(dequantize(source.tensor.data, source.tensor.tensor_type), np.float32)
    array = array.reshape(source.shape)
    if permuted_qk and ".self_attn.q_proj." in source.hf_name:
        return unpermute_rows(array, heads)
    if permuted_qk and ".self_attn.k_proj." in source.hf_name:
        return unpermute_rows(array, kv_heads)
    return array


def unpermute_rows(array: Any, heads: int) -> Any:
    """Undo llama.cpp's rotary row permutation of a Q or K projection (weight or bias).

    llama.cpp stores each head's rows as interleaved pairs (x0, x_half, x1, x_half+1, ...);
    Hugging Face keeps the two halves apart. Rows: [heads * head_dim] -> the same, reordered.
    """
    rows = array.shape[0]
    if rows % (2 * heads):
        raise GGUFError(f"cannot un-permute {rows} rows into {heads} heads of pairs")
    pairs = array.reshape(heads, rows // heads // 2, 2, *array.shape[1:])
    return np.ascontiguousarray(pairs.swapaxes(1, 2).reshape(array.shape))
