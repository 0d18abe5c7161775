"""Turn a decoded manifest document into a `Manifest`, rejecting anything SPEC.md forbids.

Every check raises a typed `ManifestError` subclass naming the manifest, the tensor or file and
the reason, so a malformed or malicious checkpoint never reaches the loader.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

from checkpoint_format import manifest as m
from checkpoint_format.dtypes import itemsize
from checkpoint_format.errors import LayoutError, ManifestError, UnsupportedFormatError
from checkpoint_format.names import check_name

_HEX8 = re.compile(r"[0-9a-f]{8}")
_FIX = "Re-convert the checkpoint with `stoke convert`."


def _get(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise ManifestError(f"{where}: missing key {key!r}. {_FIX}")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}: {key!r} is {value!r}, expected {_kind_name(kind)}. {_FIX}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _natural(doc: dict[str, Any], key: str, where: str) -> int:
    value: int = _get(doc, key, int, where)
    if value < 0:
        raise LayoutError(f"{where}: {key!r} is negative ({value}). {_FIX}")
    return value


def _check_header(doc: dict[str, Any], source: str) -> None:
    fmt = doc.get("format")
    if fmt != m.FORMAT_NAME:
        raise UnsupportedFormatError(
            f"{source}: format is {fmt!r}, expected {m.FORMAT_NAME!r}; this is not a stoke "
            "checkpoint manifest."
        )
    version = doc.get("format_version")
    if version != m.FORMAT_VERSION or isinstance(version, bool):
        raise UnsupportedFormatError(
            f"{source}: format_version {version!r} is not supported (this stoke reads "
            f"version {m.FORMAT_VERSION}). Upgrade stoke or re-convert the checkpoint."
        )
    if doc.get("alignment") != m.ALIGNMENT or doc.get("checksum") != m.CHECKSUM:
        raise UnsupportedFormatError(
            f"{source}: alignment {doc.get('alignment')!r} / checksum {doc.get('checksum')!r} "
            f"unsupported; version 1 requires {m.ALIGNMENT} / {m.CHECKSUM!r}. {_FIX}"
        )


def _parse_partition(doc: Any, index: int, chunk_size: int, source: str) -> m.PartitionEntry:
    where = f"{source}: partition {index}"
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected an object, got {doc!r}. {_FIX}")
    file = check_name(_get(doc, "file", str, where), kind="partition file", source=where)
    nbytes = _natural(doc, "nbytes", where)
    if nbytes % m.ALIGNMENT:
        raise LayoutError(f"{where} ({file}): nbytes {nbytes} is not a multiple of 4096. {_FIX}")
    chunks = _get(doc, "chunks", list, where)
    expected = math.ceil(nbytes / chunk_size)
    if len(chunks) != expected:
        raise ManifestError(
            f"{where} ({file}): {len(chunks)} chunk checksums for {nbytes} bytes, expected "
            f"{expected}. {_FIX}"
        )
    for i, c in enumerate(chunks):
        if not isinstance(c, str) or not _HEX8.fullmatch(c):
            raise ManifestError(f"{where} ({file}): chunk {i} checksum {c!r} is not 8 hex digits")
    return m.PartitionEntry(file=file, nbytes=nbytes, chunks=tuple(chunks))


def _parse_tensor(
    name: str, doc: Any, partitions: tuple[m.PartitionEntry, ...], source: str
) -> m.TensorEntry:
    where = f"{source}: tensor {name!r}"
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected an object, got {doc!r}. {_FIX}")
    part = _natural(doc, "partition", where)
    if part >= len(partitions):
        raise LayoutError(f"{where}: partition {part} does not exist ({len(partitions)} listed)")
    offset, nbytes = _natural(doc, "offset", where), _natural(doc, "nbytes", where)
    dtype = _get(doc, "dtype", str, where)
    shape = _get(doc, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise LayoutError(f"{where}: shape {shape!r} is not a list of non-negative ints. {_FIX}")
    want = math.prod(shape) * itemsize(dtype, where=where)
    if nbytes != want:
        raise LayoutError(
            f"{where}: nbytes {nbytes} but shape {shape} of {dtype} needs {want}. {_FIX}"
        )
    if offset % m.ALIGNMENT:
        raise LayoutError(f"{where}: offset {offset} is not a multiple of 4096. {_FIX}")
    limit = partitions[part].nbytes
    if offset + nbytes > limit:
        raise LayoutError(
            f"{where}: bytes {offset}..{offset + nbytes} are out of range of "
            f"{partitions[part].file} ({limit} bytes). {_FIX}"
        )
    return m.TensorEntry(part, offset, nbytes, dtype, tuple(shape))


def _check_overlaps(tensors: dict[str, m.TensorEntry], partitions: tuple, source: str) -> None:
    spans = sorted(
        (t.partition, t.offset, t.offset + t.nbytes, name)
        for name, t in tensors.items()
        if t.nbytes
    )
    for (pa, _, end_a, a), (pb, start_b, _, b) in itertools.pairwise(spans):
        if pa == pb and start_b < end_a:
            raise LayoutError(
                f"{source}: tensors {a!r} and {b!r} overlap in {partitions[pa].file} "
                f"(bytes {start_b}..{end_a}). Tied weights belong in 'aliases'. {_FIX}"
            )


def _parse_aliases(doc: Any, tensors: dict[str, m.TensorEntry], source: str) -> dict[str, str]:
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: 'aliases' must be an object. {_FIX}")
    for alias, target in doc.items():
        check_name(alias, kind="alias", source=source)
        if alias in tensors or target not in tensors:
            raise LayoutError(
                f"{source}: alias {alias!r} -> {target!r} must name a new tensor and point to a "
                f"stored tensor (not an alias or a missing name). {_FIX}"
            )
    return dict(doc)


def _parse_files(doc: Any, taken: set[str], source: str) -> dict[str, m.FileEntry]:
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: 'files' must be an object. {_FIX}")
    files = {}
    for name, entry in doc.items():
        check_name(name, kind="copied file", source=source)
        where = f"{source}: file {name!r}"
        if name in taken or not isinstance(entry, dict):
            raise ManifestError(f"{where}: clashes with another file or is not an object. {_FIX}")
        crc = _get(entry, "crc32", str, where)
        if not _HEX8.fullmatch(crc):
            raise ManifestError(f"{where}: crc32 {crc!r} is not 8 hex digits. {_FIX}")
        files[name] = m.FileEntry(nbytes=_natural(entry, "nbytes", where), crc32=crc)
    return files


def parse_manifest(doc: Any, *, source: str) -> m.Manifest:
    """Validate a decoded manifest document (SPEC.md) and build the `Manifest`."""
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: the manifest must be a JSON object. {_FIX}")
    _check_header(doc, source)
    chunk_size = _natural(doc, "chunk_size", source)
    if chunk_size == 0 or chunk_size % m.ALIGNMENT or chunk_size > m.MAX_CHUNK_SIZE:
        raise LayoutError(
            f"{source}: chunk_size {chunk_size} is not a positive multiple of 4096 of at most "
            f"{m.MAX_CHUNK_SIZE} bytes (1 GiB)"
        )
    config = _get(doc, "config", (dict, type(None)), source)
    raw_parts = _get(doc, "partitions", list, source)
    parts = tuple(_parse_partition(p, i, chunk_size, source) for i, p in enumerate(raw_parts))
    part_files = {p.file for p in parts}
    if len(part_files) != len(parts) or m.MANIFEST_NAME in part_files:
        raise ManifestError(f"{source}: partition file names must be unique. {_FIX}")
    raw_tensors = _get(doc, "tensors", dict, source)
    tensors = {
        check_name(name, kind="tensor", source=source): _parse_tensor(name, t, parts, source)
        for name, t in raw_tensors.items()
    }
    _check_overlaps(tensors, parts, source)
    aliases = _parse_aliases(_get(doc, "aliases", dict, source), tensors, source)
    files = _parse_files(_get(doc, "files", dict, source), part_files | {m.MANIFEST_NAME}, source)
    return m.Manifest(
        chunk_size=chunk_size,
        partitions=parts,
        tensors=tensors,
        aliases=aliases,
        files=files,
        config=config,
    )
