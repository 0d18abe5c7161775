"""`CheckpointStore`: one node's tiered checkpoint store (DRAM in /dev/shm, local disk, with
S3 and local directories as sources).

A checkpoint is identified by the SHA-256 of its manifest bytes (`identity.py`). `ensure`
brings one into a tier and returns a directory ready for `loader.load_state_dict`; concurrent
`ensure`s of the same checkpoint share one download or copy. Filling DRAM always goes through
the disk tier (remote -> disk -> DRAM), so the disk budget must fit any checkpoint DRAM holds.

Restarts: the disk tier's index and directories are reconciled when it opens, and interrupted
downloads resume. The DRAM tier is rebuilt the same way from /dev/shm (which survives an agent
restart, not a reboot): whole entries are kept, anything else is deleted. Pins start at zero:
they belonged to the previous agent's instances.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from checkpoint_format import MANIFEST_NAME
from node_agent.facts.sources import LocalKind, S3Source, Source, parse_s3_uri, parse_source
from node_agent.facts.tiers import TIERS_FASTEST_FIRST, Origin, TierName, parse_tier
from node_agent.store.bandwidth import BandwidthMeter, measure_read_bandwidth
from node_agent.store.coalesce import SingleFlight
from node_agent.store.config import StoreConfig
from node_agent.store.conversions import MEMO_NAME, ConversionMemo
from node_agent.store.errors import NotHeldError
from node_agent.store.identity import checkpoint_key, is_key
from node_agent.store.origin import Ensured
from node_agent.store.populate import Populator
from node_agent.store.s3fetch import S3Fetcher
from node_agent.store.space import ArenaUsage
from node_agent.store.stats import StatsCounter, StoreStats
from node_agent.store.stream import Tap
from node_agent.store.tier import Tier
from node_agent.store.tier_state import Holding

log = logging.getLogger(__name__)

_PIN_RETRIES = 3  # an entry evicted between its fill and its pin is filled again


class CheckpointStore:
    """DRAM and disk tiers under byte budgets, LRU, with pinned entries never evicted.

    Use as a context manager (or call `open` / `close`): opening takes each tier directory's
    lock, so two agents can never share one. All methods are thread-safe.
    """

    def __init__(self, config: StoreConfig, *, s3_client: Any | None = None) -> None:
        """`s3_client`: a boto3 S3 client to use instead of one built from the environment."""
        self.config = config
        self.tiers: dict[TierName, Tier] = {
            TierName.DRAM: Tier(
                TierName.DRAM,
                config.dram_root,
                config.dram_budget,
                keep_partials=False,
                arena=config.dram_arena,
            ),
            TierName.DISK: Tier(
                TierName.DISK, config.disk_dir, config.disk_budget, keep_partials=True
            ),
        }
        self.flights: SingleFlight[Ensured] = SingleFlight()  # keyed by (key, tier)
        self._conversions: SingleFlight[tuple[str, bytes]] = (
            SingleFlight()
        )  # keyed by source directory
        self.meter = BandwidthMeter(config.bandwidth_alpha)
        self._stats = StatsCounter()
        self._s3_client = s3_client
        self._populator: Populator | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> CheckpointStore:
        """Open both tiers (rebuilding their state from disk and /dev/shm); returns self."""
        opened: list[Tier] = []
        try:
            for tier in self.tiers.values():
                tier.open()
                opened.append(tier)
        except BaseException:
            for tier in opened:
                tier.close()
            raise
        fetcher = S3Fetcher(self.config.fetch, self._s3_client) if self._s3_client else None
        memo = ConversionMemo(Path(self.config.disk_dir) / MEMO_NAME)
        self._populator = Populator(self.config, self.tiers, fetcher, self.meter, self._stats, memo)
        return self

    def close(self) -> None:
        """Persist indexes and release the tier locks. Held checkpoints stay on disk/shm.

        Downloads in flight stop starting parts and fail with `StoreClosedError` (their verified
        parts stay for a resume); a fill that finishes after this is refused by its closed tier,
        so nothing lands in a directory this store no longer owns."""
        if self._populator is not None:
            self._populator.stop()
        for tier in self.tiers.values():
            tier.close()

    def __enter__(self) -> CheckpointStore:
        return self.open()

    def __exit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def arena_path(self) -> Path | None:
        """The DRAM tier's arena file (workers map it once), or None without an arena."""
        space = self.tiers[TierName.DRAM].space
        return space.arena.path if space is not None else None

    @property
    def fetcher(self) -> S3Fetcher:
        """The S3 fetcher (and, as `fetcher.client`, the boto3 client every download uses)."""
        return self._pop.fetcher

    @property
    def _pop(self) -> Populator:
        assert self._populator is not None, "open() the store first"
        return self._populator

    # -- the main verb ------------------------------------------------------------------------

    def ensure(
        self,
        source: str | os.PathLike[str] | Source,
        tier: TierName | str = TierName.DRAM,
        *,
        pin: bool = False,
    ) -> Path:
        """Make checkpoint `source` present in `tier` and return its directory there.

        `source` is `s3://bucket/prefix` (its manifest is read each time, so a changed
        checkpoint is noticed), a local stoke checkpoint, or a Hugging Face directory
        (converted once). `pin=True` also pins the entry (call `unpin` when done), atomically
        with the check that it is present. Concurrent calls for the same checkpoint and tier
        share one fill. Raises `StoreError`s (`TooLargeError`, `NoRoomError`,
        `CorruptObjectError`, `RemoteError`, `InvalidSourceError`) or `CheckpointError`s for a
        malformed checkpoint.
        """
        return self.ensure_with_origin(source, tier, pin=pin).path

    def ensure_with_origin(
        self,
        source: str | os.PathLike[str] | Source,
        tier: TierName | str = TierName.DRAM,
        *,
        pin: bool = False,
        tap: Tap | None = None,
    ) -> Ensured:
        """`ensure`, also saying where the bytes came from (`Origin`): the tier that already
        held them, or the download, copy or conversion that brought them in. Callers sharing
        one fill share its origin. Every tier holding the checkpoint learns `source` as one of
        its sources (`Holding.sources`).

        `tap`: if this call promotes the checkpoint from disk into DRAM itself, the copy
        reports its staging files and every piece written to it (`stream.Tap`), so the bytes
        can be used before the call returns. It hears nothing otherwise (already in DRAM, or
        another call's fill in progress)."""
        name = parse_tier(tier)
        src = parse_source(source)
        for _ in range(_PIN_RETRIES):
            # Each step can lose a race with eviction (the entry, or a converted copy the fill
            # was to start from, leaves a tier meanwhile): then start over, a bounded number of
            # times; the last try lets NotHeldError out with its message.
            try:
                return self._ensure_pinned(src, name, pin, tap)
            except NotHeldError as exc:
                log.info("%s: evicted while being ensured (%s); filling it again", src, exc)
        return self._ensure_pinned(src, name, pin, tap)

    def _ensure_pinned(self, src: Source, tier: TierName, pin: bool, tap: Tap | None) -> Ensured:
        key, ensured = self._ensure_once(src, tier, tap)
        for other in self.tiers.values():
            other.remember(key, src.uri)
        return Ensured(self.tiers[tier].pin(key), ensured.origin) if pin else ensured

    @contextlib.contextmanager
    def use(
        self, source: str | os.PathLike[str] | Source, tier: TierName | str = TierName.DRAM
    ) -> Iterator[Path]:
        """`with store.use(src) as path:` ensures and pins for the block, then unpins."""
        path = self.ensure(source, tier, pin=True)
        try:
            yield path
        finally:
            self.tiers[parse_tier(tier)].unpin(path.name)

    def _ensure_once(
        self, src: Source, tier: TierName, tap: Tap | None = None
    ) -> tuple[str, Ensured]:
        key, manifest_bytes, converted = self._identify(src)
        ensured = self.flights.run(
            (key, tier), lambda: self._fill(key, tier, src, manifest_bytes, tap, converted)
        )
        return key, Ensured(ensured.path, Origin.CONVERTED) if converted else ensured

    def _identify(self, src: Source) -> tuple[str, bytes, bool]:
        """The checkpoint's key and manifest bytes, and whether this call converted it (a
        Hugging Face directory is converted once, into the disk tier)."""
        if isinstance(src, S3Source):
            data = self.fetcher.read_manifest(src)
            return checkpoint_key(data), data, False
        if src.kind is LocalKind.CHECKPOINT:
            data = (src.path / MANIFEST_NAME).read_bytes()
            return checkpoint_key(data), data, False
        key = self._pop.memo.lookup(src)
        held = self._held_manifest(key) if key else None
        if key is not None and held is not None:
            return key, held, False
        key, data = self._conversions.run(src.uri, lambda: self._pop.convert(src))
        return key, data, True

    def _held_manifest(self, key: str) -> bytes | None:
        """Manifest bytes of `key` from the fastest tier holding it (None if none does)."""
        for tier in TIERS_FASTEST_FIRST:
            path = self.tiers[tier].path_of(key)
            if path is None:
                continue  # a slower tier may still hold it
            try:
                return (path / MANIFEST_NAME).read_bytes()
            except FileNotFoundError:  # evicted just now
                continue
        return None

    def _fill(
        self,
        key: str,
        tier: TierName,
        src: Source,
        manifest_bytes: bytes,
        tap: Tap | None = None,
        converted: bool = False,
    ) -> Ensured:
        target = self.tiers[tier]
        if target.path_of(key) is not None:
            return Ensured(target.touch(key, src.uri), Origin(tier.value))
        if tier is TierName.DISK:
            path, origin = self._pop.fill_disk(key, src, manifest_bytes)
            return Ensured(path, origin)
        for _ in range(_PIN_RETRIES):
            on_disk = self.flights.run(
                (key, TierName.DISK), lambda: self._fill(key, TierName.DISK, src, manifest_bytes)
            )
            if tap is not None:
                tap.came_from(Origin.CONVERTED if converted else on_disk.origin)
            try:
                return Ensured(self._pop.promote(key, src.uri, tap), on_disk.origin)
            except NotHeldError:
                log.info("%s left the disk tier before its promotion; fetching again", key[:12])
        if tap is not None:
            tap.came_from(Origin.DISK)
        return Ensured(self._pop.promote(key, src.uri, tap), Origin.DISK)

    # -- queries and paired verbs ------------------------------------------------------------

    def locate(self, key_or_source: str) -> Holding | None:
        """The fastest tier's holding of a checkpoint given its key or a source known to hold it
        (no I/O beyond this node: by source it means "what was last fetched from there")."""
        tiers: list[tuple[TierName, str | None]]
        if is_key(key_or_source):
            tiers = [(t, key_or_source) for t in TIERS_FASTEST_FIRST]
        else:
            uri = _source_uri(key_or_source)
            tiers = [(t, self.tiers[t].key_for_source(uri)) for t in TIERS_FASTEST_FIRST]
        for name, key in tiers:
            if key is None:
                continue
            found = [h for h in self.tiers[name].holdings() if h.key == key]
            if found:
                return found[0]
        return None

    def holdings(self) -> dict[TierName, list[Holding]]:
        """Per tier, every held checkpoint (key, sources, nbytes, last_used, pinned), MRU first."""
        return {name: tier.holdings() for name, tier in self.tiers.items()}

    def arenas(self) -> dict[TierName, ArenaUsage]:
        """Each tier's arena (the DRAM tier's, when it has one)."""
        usage = {name: tier.arena_usage() for name, tier in self.tiers.items()}
        return {name: u for name, u in usage.items() if u is not None}

    def can_admit(self, tier: TierName | str, nbytes: int) -> bool:
        """True if `tier` could make room for `nbytes` by evicting unpinned entries."""
        return self.tiers[parse_tier(tier)].can_admit(nbytes)

    def evict(self, key: str, tier: TierName | str) -> int:
        """Remove an unpinned checkpoint from `tier`; returns bytes freed."""
        return self.tiers[parse_tier(tier)].evict(key)

    def pin(self, key: str, tier: TierName | str) -> Path:
        """Protect a held checkpoint from eviction (refcounted); returns its directory."""
        return self.tiers[parse_tier(tier)].pin(key)

    def unpin(self, key: str, tier: TierName | str) -> None:
        """Undo one `pin`."""
        self.tiers[parse_tier(tier)].unpin(key)

    def bandwidths(self) -> dict[str, float]:
        """Measured bytes/s out of each `Origin` place: dram, disk, remote (EWMAs; absent if
        unmeasured)."""
        return self.meter.snapshot()

    def self_measure(self, nbytes: int = 64 << 20) -> dict[str, float]:
        """Seed the DRAM and disk bandwidths by reading a test file in each tier directory."""
        for name in TIERS_FASTEST_FIRST:
            rate = measure_read_bandwidth(self.tiers[name].root, nbytes)
            self.meter.record(Origin(name), nbytes, nbytes / rate)
        return self.bandwidths()

    def stats(self) -> StoreStats:
        """Totals moved since the store opened."""
        return self._stats.snapshot()


def _source_uri(text: str) -> str:
    """The URI under which entries from `text` are recorded (no I/O, no validation of
    local directories' contents)."""
    if text.startswith("s3://"):
        return parse_s3_uri(text).uri
    return str(Path(text).expanduser().resolve())
