"""Pure planning of a download: which byte ranges to GET and which checksums each must meet.

Each part of a partition starts on a chunk boundary and covers whole chunks, so every part
can be verified on its own as its bytes arrive. Copied files (config, tokenizer) are one part
each, checked against their whole-file CRC-32.
"""

from __future__ import annotations

from dataclasses import dataclass

from checkpoint_format import Manifest


@dataclass(frozen=True)
class Check:
    """Bytes `[start, end)` of a file must have CRC-32 `crc` (chunk `chunk` of the file)."""

    chunk: int
    start: int
    end: int
    crc: str


@dataclass(frozen=True)
class Part:
    """One ranged GET: bytes `[start, end)` of checkpoint file `file`."""

    file: str
    index: int
    start: int
    end: int
    checks: tuple[Check, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def id(self) -> str:
        """Stable name of the part, recorded in the resume sidecar."""
        return f"{self.file}:{self.index}"


def effective_part_size(part_size: int, chunk_size: int) -> int:
    """`part_size` rounded up to a whole number of chunks."""
    return max(1, -(-part_size // chunk_size)) * chunk_size


def plan_parts(manifest: Manifest, part_size: int) -> list[Part]:
    """Every part of the checkpoint's partitions (in file order), then its copied files."""
    step = effective_part_size(part_size, manifest.chunk_size)
    per_chunk = step // manifest.chunk_size
    parts: list[Part] = []
    for entry in manifest.partitions:
        for index, start in enumerate(range(0, entry.nbytes, step)):
            end = min(start + step, entry.nbytes)
            first = index * per_chunk
            checks = tuple(
                Check(c, c * manifest.chunk_size, min((c + 1) * manifest.chunk_size, end), crc)
                for c, crc in enumerate(entry.chunks[first : first + per_chunk], start=first)
            )
            parts.append(Part(entry.file, index, start, end, checks))
    for name, f in manifest.files.items():
        parts.append(Part(name, 0, 0, f.nbytes, (Check(0, 0, f.nbytes, f.crc32),)))
    return parts


def file_sizes(manifest: Manifest) -> dict[str, int]:
    """Every file a download creates (manifest excluded) -> its size."""
    sizes = {p.file: p.nbytes for p in manifest.partitions}
    return sizes | {name: f.nbytes for name, f in manifest.files.items()}
