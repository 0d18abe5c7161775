"""Download a checkpoint from S3 into a staging directory: parallel ranged GETs, every chunk's
CRC-32 checked as its bytes arrive, resumable.

Bytes are written at their offsets in partial files inside the staging directory (never the
final location); a part is recorded in the resume sidecar only after all its chunks verified;
the manifest is written last. The caller renames the staging directory into its tier only
after `fetch` returns, so nothing half-written or unverified is ever served.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checkpoint_format import MANIFEST_NAME, Manifest
from node_agent.facts.errors import RemoteError
from node_agent.facts.s3client import make_client, remote_error
from node_agent.facts.sources import S3Source
from node_agent.store.config import FetchConfig
from node_agent.store.copy import write_manifest
from node_agent.store.errors import CorruptObjectError, StoreClosedError
from node_agent.store.fetch_plan import Part, effective_part_size, file_sizes, plan_parts
from node_agent.store.fetch_state import FetchState, part_is_intact
from node_agent.store.sysio import allocate

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 256 << 20


@dataclass(frozen=True)
class FetchResult:
    """What one `fetch` moved: bytes received now, parts reused from an interrupted attempt."""

    nbytes_total: int
    nbytes_fetched: int
    parts_fetched: int
    parts_reused: int
    seconds: float

    @property
    def bytes_per_second(self) -> float:
        return self.nbytes_fetched / self.seconds if self.seconds > 0 else 0.0


class _ChunkChecker:
    """Checks a part's chunks as its bytes stream past, in order."""

    def __init__(self, where: str, part: Part) -> None:
        self.where, self.checks = where, part.checks
        self._next, self._crc = 0, 0

    def update(self, data: memoryview, offset: int) -> None:
        """Account for `data`, which starts at file offset `offset`."""
        while len(data):
            check = self.checks[self._next]
            take = min(len(data), check.end - offset)
            self._crc = zlib.crc32(data[:take], self._crc)
            data, offset = data[take:], offset + take
            if offset == check.end:
                got = f"{self._crc & 0xFFFFFFFF:08x}"
                if got != check.crc:
                    raise CorruptObjectError(
                        self.where, check.chunk, check.start, check.end, check.crc, got
                    )
                self._next, self._crc = self._next + 1, 0


class S3Fetcher:
    """Downloads checkpoints from S3 with one shared, thread-safe boto3 client (`client`)."""

    def __init__(self, config: FetchConfig, client: Any | None = None) -> None:
        self.config = config
        self.closing = threading.Event()  # set by the store's close(): parts stop starting
        self.client = client or make_client(
            pool_size=config.concurrency + 2, max_attempts=config.max_attempts
        )

    def read_manifest(self, source: S3Source) -> bytes:
        """The manifest bytes at `source` (one GET). Raises `RemoteError` if absent."""
        uri = source.object_uri(MANIFEST_NAME)
        try:
            response = self.client.get_object(
                Bucket=source.bucket, Key=source.object_key(MANIFEST_NAME)
            )
            if response["ContentLength"] > MAX_MANIFEST_BYTES:
                raise RemoteError(
                    f"{uri}: {response['ContentLength']} bytes is too large for a manifest; "
                    "this is not a stoke checkpoint prefix."
                )
            data: bytes = response["Body"].read()
        except RemoteError:
            raise
        except Exception as exc:  # botocore/urllib3 errors: translated, never swallowed
            raise remote_error(exc, uri, "reading manifest") from exc
        return data

    def fetch(
        self, source: S3Source, manifest: Manifest, manifest_bytes: bytes, key: str, staging: Path
    ) -> FetchResult:
        """Download the checkpoint into `staging`, resuming from what a previous attempt there
        verified. Raises `CorruptObjectError` (naming object and chunk) or `RemoteError`; the
        staging directory then holds only verified parts plus unrecorded partial bytes."""
        start = time.perf_counter()
        parts = plan_parts(manifest, self.config.part_size)
        state = FetchState(
            staging, key, effective_part_size(self.config.part_size, manifest.chunk_size)
        )
        reused = {
            p.id for p in parts if p.id in state.load() and part_is_intact(staging / p.file, p)
        }
        state.start(reused)
        todo = [p for p in parts if p.id not in reused and p.nbytes]
        fetched = self._fetch_parts(source, staging, manifest, todo, state)
        write_manifest(staging, manifest_bytes, durable=True)
        state.remove()
        total = sum(p.nbytes for p in parts)
        seconds = time.perf_counter() - start
        return FetchResult(total, fetched, len(todo), len(reused), seconds)

    def _fetch_parts(
        self,
        source: S3Source,
        staging: Path,
        manifest: Manifest,
        todo: list[Part],
        state: FetchState,
    ) -> int:
        """Run every part on the pool; on the first failure, skip parts not yet started, let
        running ones finish (their verified bytes are kept for a resume), then raise it."""
        fds = _open_files(staging, file_sizes(manifest))
        run = _Run(stop=threading.Event(), received=_Counter(), state=state)
        first_error: BaseException | None = None
        try:
            with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
                futures = [
                    pool.submit(self._fetch_part, source, part, fds[part.file], run)
                    for part in todo
                ]
                for future in as_completed(futures):
                    exc = future.exception()
                    if exc is not None and not isinstance(exc, _Skipped) and first_error is None:
                        first_error = exc
                        run.stop.set()
        finally:
            for fd in fds.values():
                os.fsync(fd)
                os.close(fd)
        if first_error is None and self.closing.is_set():
            # Parts may have been skipped: never let a caller take this for a whole download.
            first_error = StoreClosedError(
                f"{source}: the store closed during the download; verified parts are kept and "
                "the next fetch resumes from them"
            )
        if first_error is not None:
            raise first_error
        return run.received.value

    def _fetch_part(self, source: S3Source, part: Part, fd: int, run: _Run) -> None:
        """GET one range, verify its chunks and write it at its offset, then record it."""
        if run.stop.is_set() or self.closing.is_set():
            raise _Skipped()
        uri = source.object_uri(part.file)
        checker = _ChunkChecker(uri, part)
        offset = part.start
        try:
            response = self.client.get_object(
                Bucket=source.bucket,
                Key=source.object_key(part.file),
                Range=f"bytes={part.start}-{part.end - 1}",
            )
            for piece in response["Body"].iter_chunks(self.config.read_size):
                view = memoryview(piece)
                run.received.add(len(view))
                checker.update(view, offset)  # raises before a bad part is ever recorded
                _pwrite_all(fd, view, offset)
                offset += len(view)
        except (CorruptObjectError, RemoteError):
            raise
        except Exception as exc:  # botocore/urllib3 errors: translated, never swallowed
            raise remote_error(exc, uri, f"downloading bytes {part.start}..{part.end} of") from exc
        if offset != part.end:
            raise RemoteError(
                f"{uri}: the response for bytes {part.start}..{part.end} ended at {offset}; the "
                "object is shorter than its manifest says. Push the checkpoint again."
            )
        run.state.mark_done(part.id)


@dataclass
class _Run:
    """Shared state of one fetch's workers."""

    stop: threading.Event
    received: _Counter
    state: FetchState


class _Skipped(Exception):
    """A part not started because another part already failed."""


class _Counter:
    """A thread-safe byte counter."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> int:
        with self._lock:
            self.value += n
            return self.value


def _open_files(staging: Path, sizes: dict[str, int]) -> dict[str, int]:
    """Open (creating, never truncating: a resumed download keeps its bytes) every file."""
    fds: dict[str, int] = {}
    try:
        for name, nbytes in sizes.items():
            fd = os.open(staging / name, os.O_RDWR | os.O_CREAT, 0o644)
            fds[name] = fd
            if os.fstat(fd).st_size > nbytes:
                os.ftruncate(fd, nbytes)
            allocate(fd, staging / name, nbytes)
    except BaseException:  # e.g. NoRoomError: close what was opened, once per retry adds up
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
