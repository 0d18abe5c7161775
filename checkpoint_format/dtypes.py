"""The dtypes the format defines, their sizes, and their torch and safetensors spellings.

Kept free of a module-level torch import so reading a manifest stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from checkpoint_format.errors import UnknownDtypeError

if TYPE_CHECKING:
    import torch

ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}

FLOATING: frozenset[str] = frozenset(
    {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
)

# safetensors' header spelling -> ours (the dtypes we do not define are rejected).
FROM_SAFETENSORS: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def itemsize(name: str, *, where: str = "") -> int:
    """Bytes per element of dtype `name`; raises `UnknownDtypeError` naming `where`."""
    try:
        return ITEMSIZE[name]
    except (KeyError, TypeError):
        raise UnknownDtypeError(
            f"{where or 'tensor'}: unknown dtype {name!r}; the format defines "
            f"{', '.join(ITEMSIZE)}. Re-convert the checkpoint with a supported dtype."
        ) from None


def to_torch(name: str, *, where: str = "") -> torch.dtype:
    """The `torch.dtype` for format dtype `name`."""
    import torch

    itemsize(name, where=where)
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


def from_torch(dtype: torch.dtype, *, where: str = "") -> str:
    """The format's name for `dtype`; raises `UnknownDtypeError` for one it does not define."""
    name = str(dtype).removeprefix("torch.")
    itemsize(name, where=where)
    return name
