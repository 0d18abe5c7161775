"""Where each tensor goes: aligned offsets per partition, computed before any byte is written."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from checkpoint_format.dtypes import itemsize
from checkpoint_format.manifest import ALIGNMENT, TensorEntry
from checkpoint_format.names import check_name


@dataclass(frozen=True)
class TensorSpec:
    """What the layout needs to know about a tensor before its bytes exist."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    partition: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype, where=f"tensor {self.name!r}")


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """Smallest multiple of `alignment` that is >= `n`."""
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class Layout:
    """Offsets of every tensor and the (aligned) size of every partition."""

    tensors: dict[str, TensorEntry]
    partition_sizes: tuple[int, ...]

    def in_partition(self, partition: int) -> list[tuple[str, TensorEntry]]:
        """The tensors of `partition`, in offset order (the order they are written)."""
        items = [(n, t) for n, t in self.tensors.items() if t.partition == partition]
        return sorted(items, key=lambda item: item[1].offset)


def plan_layout(specs: Sequence[TensorSpec], *, num_partitions: int | None = None) -> Layout:
    """Place tensors in the given order, each at the next 4 KiB boundary of its partition.

    Raises `ValueError` for duplicate names or a negative partition (programming errors) and
    `UnsafeNameError` / `UnknownDtypeError` for names and dtypes the format forbids.
    """
    count = num_partitions
    if count is None:
        count = max((s.partition + 1 for s in specs), default=1)
    cursor = [0] * count
    tensors: dict[str, TensorEntry] = {}
    for spec in specs:
        check_name(spec.name, kind="tensor", source="layout")
        if spec.name in tensors:
            raise ValueError(f"tensor {spec.name!r} appears twice")
        if not 0 <= spec.partition < count:
            raise ValueError(f"tensor {spec.name!r}: partition {spec.partition} not in 0..{count}")
        offset = cursor[spec.partition]
        nbytes = spec.nbytes
        tensors[spec.name] = TensorEntry(spec.partition, offset, nbytes, spec.dtype, spec.shape)
        cursor[spec.partition] = align_up(offset + nbytes)
    return Layout(tensors=tensors, partition_sizes=tuple(cursor))
