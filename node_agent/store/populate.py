"""Filling a tier with one checkpoint: remote -> disk (download), local -> disk (copy or
convert), disk -> DRAM (promotion), DRAM -> disk (when only DRAM still holds it).

Every fill reserves budget first, writes into the tier's staging directory and admits it only
when whole; on failure the reservation is abandoned (a download keeps its verified parts for a
resume, unless the source was corrupt). Callers coalesce: one fill per (key, tier) at a time.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from checkpoint_format import MANIFEST_NAME, Manifest
from node_agent.facts.sources import LocalKind, LocalSource, S3Source, Source
from node_agent.facts.tiers import Origin, TierName
from node_agent.store.bandwidth import BandwidthMeter
from node_agent.store.config import StoreConfig
from node_agent.store.conversions import (
    ConversionMemo,
    conversion_staging_key,
    convert_into,
    estimate_converted_nbytes,
)
from node_agent.store.copy import CopyResult, copy_checkpoint
from node_agent.store.errors import CorruptObjectError, NotHeldError
from node_agent.store.identity import checkpoint_key
from node_agent.store.layout import stored_nbytes
from node_agent.store.s3fetch import S3Fetcher
from node_agent.store.stats import StatsCounter
from node_agent.store.stream import Tap
from node_agent.store.tier import Reservation, Tier

log = logging.getLogger(__name__)


class Populator:
    """The fills, sharing the store's tiers, fetcher, meter and counters."""

    def __init__(
        self,
        config: StoreConfig,
        tiers: dict[TierName, Tier],
        fetcher: S3Fetcher | None,
        meter: BandwidthMeter,
        stats: StatsCounter,
        memo: ConversionMemo,
    ) -> None:
        self.config, self.tiers, self._fetcher = config, tiers, fetcher
        self.meter, self.stats, self.memo = meter, stats, memo
        self._fetcher_lock = threading.Lock()
        self._stopping = False

    @property
    def fetcher(self) -> S3Fetcher:
        """The S3 fetcher, created on first use (boto3 is imported only then)."""
        with self._fetcher_lock:
            if self._fetcher is None:
                self._fetcher = S3Fetcher(self.config.fetch)
                if self._stopping:
                    self._fetcher.closing.set()
            return self._fetcher

    def stop(self) -> None:
        """Make downloads in flight (and any later one) stop starting parts."""
        with self._fetcher_lock:
            self._stopping = True
            if self._fetcher is not None:
                self._fetcher.closing.set()

    def fill_disk(self, key: str, source: Source, manifest_bytes: bytes) -> tuple[Path, Origin]:
        """Put checkpoint `key` into the disk tier, from DRAM if it is there, else `source`;
        returns its directory and where the bytes came from."""
        disk = self.tiers[TierName.DISK]
        manifest = Manifest.from_json(manifest_bytes, source=f"{source}/{MANIFEST_NAME}")
        reservation = disk.reserve(key, stored_nbytes(manifest, manifest_bytes))
        try:
            if self._copy_from_dram(key, manifest, manifest_bytes, reservation):
                origin = Origin.DRAM
            else:
                origin = self._fill_from_source(key, source, manifest, manifest_bytes, reservation)
        except CorruptObjectError:
            disk.abandon(reservation, keep_partial=False)  # nothing from a corrupt source stays
            raise
        except BaseException:
            disk.abandon(reservation, keep_partial=True)  # verified parts serve a resume
            raise
        return disk.admit(reservation, source.uri).path, origin

    def _fill_from_source(
        self, key: str, source: Source, manifest: Manifest, data: bytes, res: Reservation
    ) -> Origin:
        if isinstance(source, S3Source):
            result = self.fetcher.fetch(source, manifest, data, key, res.staging)
            self.meter.record(Origin.REMOTE, result.nbytes_fetched, result.seconds)
            self.stats.add(
                downloads=1,
                bytes_downloaded=result.nbytes_fetched,
                parts_reused=result.parts_reused,
            )
            log.info(
                "downloaded %s (%s) at %.0f MB/s, %d parts reused",
                source,
                key[:12],
                result.bytes_per_second / 1e6,
                result.parts_reused,
            )
            return Origin.REMOTE
        if source.kind is not LocalKind.CHECKPOINT:
            # An HF directory is read only by convert(); its converted copy was evicted between
            # identifying it and filling: `ensure` starts over and converts again.
            raise NotHeldError(f"the converted copy of {source} left the store before it was used")
        self._copy(source.path, res.staging, manifest, data, verify=True, durable=True)
        self.stats.add(imports=1)
        return Origin.LOCAL

    def _copy(
        self,
        src: Path,
        staging: Path,
        manifest: Manifest,
        data: bytes,
        *,
        verify: bool,
        durable: bool,
        tap: Tap | None = None,
        committed: Path | None = None,
        into: dict[int, memoryview] | None = None,
        from_memory: dict[int, memoryview] | None = None,
    ) -> CopyResult:
        """Copy checkpoint `src` into `staging` with the configured threads and read size
        (`into` / `from_memory`: partitions in DRAM arena extents; see `copy_checkpoint`)."""
        try:
            return copy_checkpoint(
                src,
                staging,
                manifest,
                data,
                threads=self.config.copy_threads,
                read_size=self.config.copy_read_size,
                verify=verify,
                durable=durable,
                tap=tap,
                committed=committed,
                into=into,
                from_memory=from_memory,
            )
        finally:
            for view in [*(into or {}).values(), *(from_memory or {}).values()]:
                view.release()

    def _copy_from_dram(
        self, key: str, manifest: Manifest, data: bytes, reservation: Reservation
    ) -> bool:
        dram = self.tiers[TierName.DRAM]
        try:
            src = dram.pin(key)
        except NotHeldError:
            return False
        try:
            memory = dram.arena_views(key) if dram.space is not None else None
            result = self._copy(
                src, reservation.staging, manifest, data, verify=False, durable=True,
                from_memory=memory,
            )  # fmt: skip
        finally:
            dram.unpin(key)
        self.stats.add(promotions=1, bytes_promoted=result.nbytes)
        return True

    def promote(self, key: str, source: str, tap: Tap | None = None) -> Path:
        """Copy checkpoint `key` from the disk tier (which must hold it) into DRAM, reporting
        to `tap` as it goes (see `stream.Tap`)."""
        disk, dram = self.tiers[TierName.DISK], self.tiers[TierName.DRAM]
        src = disk.pin(key)  # raises NotHeldError if evicted meanwhile; the caller retries
        try:
            data = (src / MANIFEST_NAME).read_bytes()
            manifest = Manifest.from_json(data, source=str(src / MANIFEST_NAME))
            sizes = [p.nbytes for p in manifest.partitions]
            reservation = dram.reserve(key, stored_nbytes(manifest, data), sizes)
            try:
                into = dram.views(reservation) if reservation.extents else None
                result = self._copy(
                    src,
                    reservation.staging,
                    manifest,
                    data,
                    verify=self.config.verify_promotions,
                    durable=False,
                    tap=tap,
                    committed=dram.root / key,
                    into=into,
                )
            except BaseException:
                dram.abandon(reservation)
                raise
        finally:
            disk.unpin(key)
        self.meter.record(Origin.DISK, result.nbytes, result.seconds)
        self.stats.add(promotions=1, bytes_promoted=result.nbytes)
        log.info(
            "promoted %s to DRAM at %.0f MB/s (%s reads)",
            key[:12],
            result.bytes_per_second / 1e6,
            "direct" if result.direct else "buffered",
        )
        return dram.admit(reservation, source).path

    def convert(self, source: LocalSource) -> tuple[str, bytes]:
        """Convert Hugging Face directory `source` into the disk tier; returns its key and
        manifest bytes."""
        disk = self.tiers[TierName.DISK]
        staging_key = conversion_staging_key(source)
        reservation = disk.reserve(staging_key, estimate_converted_nbytes(source.path))
        try:
            print_, data = convert_into(source, reservation.staging)
            key = checkpoint_key(data)
            manifest = Manifest.from_json(data, source=f"{source}/{MANIFEST_NAME}")
            reservation = disk.resize(reservation, stored_nbytes(manifest, data))
        except BaseException:
            disk.abandon(reservation)
            raise
        disk.admit(reservation, source.uri, as_key=key)
        self.memo.record(source, print_, key)
        self.stats.add(conversions=1)
        return key, data
