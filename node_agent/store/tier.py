"""One tier (DRAM in /dev/shm, or local disk): checkpoints under a byte budget, LRU, pinned
entries never evicted.

Lifecycle of an entry: `can_admit(nbytes)` -> `reserve(key, nbytes)` (makes room and returns
a staging directory) -> the caller writes the checkpoint there -> `admit(reservation)` renames
it into place, or `abandon(reservation)` discards it. `evict(key)` removes an unpinned entry;
`pin(key)` / `unpin(key)` are refcounted and protect an entry while an instance maps it.
Reservations count against the budget while they are written, so concurrent admissions never
overshoot it. All methods are thread-safe; directory deletion happens outside the lock.

The DRAM tier (`arena=True`) keeps partition bytes in its arena (`arena.py`, made and faulted
in at `open`): `reserve` is given the partition sizes and allocates one extent per partition
(`space.py`), evicting more LRU entries if the arena is too fragmented for them; the staging
directory then holds the small files and the extents' record, and the copy writes into
`views(reservation)`. Extents go back to the free list when their entry is evicted or their
write abandoned. After an unclean shutdown (the agent was killed: its index was not written by
`close`) every entry's bytes are checked against the manifest's CRC-32s when the tier reopens,
because a write that was under way may have gone wrong (the index records only committed
entries, so an interrupted promotion's extents are simply free). A clean reopen trusts them:
only the agent writes to the arena, and bytes were verified on their way into the disk tier.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from node_agent.facts.tiers import TierName
from node_agent.facts.units import format_size
from node_agent.store.arena import Arena
from node_agent.store.errors import (
    NoRoomError,
    NotHeldError,
    NotPinnedError,
    PinnedError,
    StoreClosedError,
    StoreLockedError,
    TooLargeError,
)
from node_agent.store.extents import aligned
from node_agent.store.index import closed_cleanly, load_index, save_index
from node_agent.store.layout import (
    LOCK_NAME,
    STAGING,
    TRASH,
    disk_usage,
    remove_tree,
    scan_tier,
    secure_root,
)
from node_agent.store.space import ArenaSpace, ArenaUsage
from node_agent.store.tier_state import Held, Holding, Reservation, plan_eviction

log = logging.getLogger(__name__)


class Tier:
    """A directory of checkpoints named by key, with an LRU byte budget and pins."""

    def __init__(
        self,
        name: TierName,
        root: Path,
        budget: int,
        *,
        keep_partials: bool,
        arena: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`keep_partials`: keep interrupted staging directories across restarts (downloads
        resume from them); otherwise they are deleted when the tier opens. `arena`: keep
        partition bytes in one pre-faulted arena of `budget` bytes (the DRAM tier)."""
        self.name, self.root, self.budget = name, Path(root), budget
        self._keep_partials, self._clock = keep_partials, clock
        self._use_arena = arena
        self.space: ArenaSpace | None = None
        self._held: dict[str, Held] = {}
        self._reserved: dict[str, Reservation] = {}
        self._stale: dict[str, int] = {}  # key -> bytes of an interrupted staging dir
        self._lock_fd: int | None = None
        self._mutex = threading.RLock()
        self._trash_seq = itertools.count()

    # -- opening and closing ------------------------------------------------------------------

    def open(self) -> None:
        """Take the tier's directory lock and rebuild state from the directory and its index.

        Entry directories that are whole are kept (with sources and last use from the index);
        damaged ones, trash and (unless `keep_partials`) staging leftovers are deleted. Pins
        start at zero: they belonged to instances of the previous agent.
        """
        secure_root(self.root)
        (self.root / STAGING).mkdir(exist_ok=True)
        self._take_lock()
        try:
            self._rebuild()
        except BaseException:
            self._release_lock()
            raise
        log.info(
            "%s tier at %s: %d checkpoints, %s",
            self.name,
            self.root,
            len(self._held),
            format_size(self.used_bytes),
        )

    def _rebuild(self) -> None:
        clean = closed_cleanly(self.root)
        facts = None
        if self._use_arena:
            self.space = ArenaSpace(Arena.open(self.root, self.budget))
            facts = self.space.facts
        found = scan_tier(
            self.root, load_index(self.root), keep_partials=self._keep_partials, arena=facts
        )
        self._held = {}
        for e in found.entries:
            if self.space is not None and not self._usable(e.key, e.extents, clean):
                remove_tree(self.root / e.key)
                continue
            self._held[e.key] = Held(e.key, e.sources, e.nbytes, e.last_used, e.extents)
        self._stale = dict(found.partials)
        self._save()  # not clean: if this agent is killed, the next one checks the arena

    def _usable(self, key: str, extents: tuple[tuple[int, int], ...], clean: bool) -> bool:
        """An arena entry found at open: its extents are free to take, and (after an unclean
        shutdown) its bytes pass their checksums."""
        assert self.space is not None
        if not self.space.claim(key, extents):
            return False
        if clean or self.space.verify(self.root / key, extents):
            return True
        self.space.release(extents)
        return False

    def close(self) -> None:
        """Persist the index and release the directory lock (a second close does nothing)."""
        with self._mutex:
            if self._lock_fd is None:
                return
            self._save(clean=True)
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.space is not None:
            self.space.arena.close()
            self.space = None

    def _take_lock(self) -> None:
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{self.root}: another process (a second node agent?) owns this {self.name} "
                "tier; give each agent its own directory or node id, or stop the other one."
            ) from None
        self._lock_fd = fd

    # -- queries ------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes held, reserved for writes in progress, and left by interrupted writes."""
        with self._mutex:
            return self._used()

    def _used(self) -> int:
        held = sum(h.nbytes for h in self._held.values())
        return held + sum(r.nbytes for r in self._reserved.values()) + sum(self._stale.values())

    def path_of(self, key: str) -> Path | None:
        """Directory of checkpoint `key` if this tier holds it."""
        with self._mutex:
            return self.root / key if key in self._held else None

    def holdings(self) -> list[Holding]:
        """Every held checkpoint, most recently used first."""
        with self._mutex:
            held = sorted(self._held.values(), key=lambda h: h.order_key(), reverse=True)
            return [h.snapshot(self.name, self.root / h.key) for h in held]

    def key_for_source(self, source: str) -> str | None:
        """The most recently used key known to come from `source`, if any is held."""
        with self._mutex:
            matches = [h for h in self._held.values() if source in h.sources]
            return max(matches, key=lambda h: h.order_key()).key if matches else None

    # -- admission ----------------------------------------------------------------------------

    def can_admit(self, nbytes: int) -> bool:
        """True if `nbytes` fit once unpinned entries and interrupted writes are evicted (by
        bytes: whether the arena could then hold each partition contiguously is known only
        from the partition sizes, at `reserve`)."""
        with self._mutex:
            return nbytes <= self.budget and nbytes <= self.budget - self._unevictable()

    def arena_usage(self) -> ArenaUsage | None:
        """This tier's arena: its memory, what is free in it, its start-up cost; None without."""
        with self._mutex:
            return self.space.usage() if self.space is not None else None

    @property
    def arena_seconds_per_gib(self) -> float:
        """What creating and faulting in the arena cost at open, per GiB (0 if reused)."""
        space = self.space
        return space.arena.seconds_per_gib if space is not None and space.arena.fresh else 0.0

    def _unevictable(self) -> int:
        pinned = sum(h.nbytes for h in self._held.values() if h.pins)
        return pinned + sum(r.nbytes for r in self._reserved.values())

    def reserve(self, key: str, nbytes: int, partitions: Sequence[int] = ()) -> Reservation:
        """Make room for `nbytes` (evicting LRU unpinned entries) and return a staging directory
        for checkpoint `key`. An interrupted staging directory of the same key is kept, so a
        download can resume from it. Raises `TooLargeError` if `nbytes` exceeds the budget and
        `NoRoomError` if pinned entries and writes in progress leave too little; in both cases
        nothing is evicted. An arena tier also allocates an extent for each of `partitions`
        (their sizes), evicting more if the free space is split too finely for them."""
        with self._mutex:
            assert key not in self._reserved, f"{key} reserved twice"  # callers coalesce
            self._check_fits(key, nbytes)
            if self.space is not None:
                return self._reserve_extents(key, nbytes, partitions)
            self._stale.pop(key, None)
            doomed = self._make_room(nbytes)
            staging = self.root / STAGING / key
            staging.mkdir(parents=True, exist_ok=True)
            reservation = Reservation(self.name, key, nbytes, staging)
            self._reserved[key] = reservation
        self._delete(doomed)
        return reservation

    def _reserve_extents(self, key: str, nbytes: int, sizes: Sequence[int]) -> Reservation:
        """`reserve` in an arena tier (under the lock)."""
        space = self.space
        assert space is not None
        if space.needs(sizes) > space.arena.size:
            raise TooLargeError(
                f"checkpoint {key[:12]} needs {format_size(space.needs(sizes))} of DRAM arena, "
                f"more than the whole arena of {format_size(space.arena.size)}; raise "
                "--dram-cache or use a smaller checkpoint."
            )
        lru = sorted(self._held.values(), key=Held.order_key)
        first = plan_eviction(lru, max(0, nbytes - (self.budget - self._used())))
        chosen = [self._held[k] for k in first]
        others = [h for h in lru if not h.pins and h.key not in first]
        doomed = []
        for held in space.victims(sizes, chosen, others):
            del self._held[held.key]
            space.release(held.extents)
            log.info(
                "%s tier: evicting %s (%s, LRU)", self.name, held.key[:12], format_size(held.nbytes)
            )
            doomed.append(self._to_trash(self.root / held.key))
        if doomed:
            self._save()
        staging = self.root / STAGING / key
        try:
            staging.mkdir(parents=True, exist_ok=True)
            extents = space.place(staging, sizes)
        finally:
            self._delete(doomed)  # under the lock: rare (evictions), and small (no partitions)
        reservation = Reservation(self.name, key, nbytes, staging, extents)
        self._reserved[key] = reservation
        return reservation

    def views(self, reservation: Reservation) -> dict[int, memoryview]:
        """Writable arena memory of each partition of an arena reservation (release them)."""
        space = self.space
        assert space is not None and reservation.extents, "not an arena reservation"
        extents = reservation.extents
        return {i: space.arena.view(o, aligned(n)) for i, (o, n) in enumerate(extents)}

    def arena_views(self, key: str) -> dict[int, memoryview]:
        """Arena memory of each partition of held entry `key` (pin it while reading)."""
        with self._mutex:
            space, held = self.space, self._get(key)
            assert space is not None, "not an arena tier"
            return {i: space.arena.view(o, n) for i, (o, n) in enumerate(held.extents)}

    def _check_fits(self, key: str, nbytes: int) -> None:
        if nbytes > self.budget:
            raise TooLargeError(
                f"checkpoint {key[:12]} needs {format_size(nbytes)}, more than the whole "
                f"{self.name} tier budget of {format_size(self.budget)}; raise the "
                f"{self.name} budget or use a smaller checkpoint (or fewer partitions per node)."
            )
        blocked = self._unevictable() - (self._reserved[key].nbytes if key in self._reserved else 0)
        if nbytes > self.budget - blocked:
            pinned = [h.key[:12] for h in self._held.values() if h.pins]
            raise NoRoomError(
                f"checkpoint {key[:12]} needs {format_size(nbytes)} in the {self.name} tier, but "
                f"only {format_size(self.budget - blocked)} of its "
                f"{format_size(self.budget)} budget can be freed: pinned by running instances: "
                f"{', '.join(pinned) or 'none'}; writes in progress: {len(self._reserved)}. "
                "Stop an instance or raise the budget, then retry."
            )

    def _make_room(self, nbytes: int) -> list[Path]:
        """Under the lock: drop stale partials, then LRU unpinned entries, until `nbytes` fit.
        Returns directories (already renamed into trash) to delete after the lock is released."""
        doomed = []
        for key in list(self._stale):
            if self.budget - self._used() >= nbytes:
                break
            del self._stale[key]
            doomed.append(self._to_trash(self.root / STAGING / key))
        free = self.budget - self._used()
        for key in plan_eviction(self._held.values(), max(0, nbytes - free)):
            held = self._held.pop(key)
            self._release(held.extents)
            log.info(
                "%s tier: evicting %s (%s, LRU)", self.name, key[:12], format_size(held.nbytes)
            )
            doomed.append(self._to_trash(self.root / key))
        if doomed:
            self._save()
        return doomed

    def resize(self, reservation: Reservation, nbytes: int) -> Reservation:
        """Change a reservation's size (an estimate became exact); may evict to grow it. Not in
        an arena tier (its reservations are sized exactly)."""
        assert not reservation.extents, "arena reservations are not resized"
        with self._mutex:
            if nbytes > reservation.nbytes:
                self._check_fits(reservation.key, nbytes)
                doomed = self._make_room(nbytes - reservation.nbytes)
            else:
                doomed = []
            resized = Reservation(self.name, reservation.key, nbytes, reservation.staging)
            self._reserved[reservation.key] = resized
        self._delete(doomed)
        return resized

    def admit(self, reservation: Reservation, source: str, *, as_key: str | None = None) -> Holding:
        """Rename the (complete) staging directory into place as checkpoint `as_key` (default
        `reservation.key`; a conversion learns its key only when done).

        If the tier already holds that key (another writer admitted it meanwhile, or two
        sources had the same content), the staging copy is discarded.
        """
        key = as_key or reservation.key
        with self._mutex:
            self._check_open()
            del self._reserved[reservation.key]
            if key in self._held:
                doomed = [self._to_trash(reservation.staging)]
                self._release(reservation.extents)
            else:
                os.rename(reservation.staging, self.root / key)
                nbytes, extents = reservation.nbytes, reservation.extents
                self._held[key] = Held(key, (source,), nbytes, self._clock(), extents)
                doomed = []
            held = self._held[key]
            held.touch(self._clock(), source)
            self._save()
            holding = held.snapshot(self.name, self.root / key)
        self._delete(doomed)
        return holding

    def abandon(self, reservation: Reservation, *, keep_partial: bool = False) -> None:
        """Give a reservation back. `keep_partial` keeps the staging directory (counted against
        the budget, evicted first) so that a retried download resumes from it."""
        with self._mutex:
            if self._lock_fd is None:  # closed: the directory may have a new owner; touch nothing
                return
            if self._reserved.pop(reservation.key, None) is not None:
                self._release(reservation.extents)
            if keep_partial and self._keep_partials and reservation.staging.exists():
                self._stale[reservation.key] = disk_usage(reservation.staging)
                doomed = []
            else:
                doomed = [self._to_trash(reservation.staging)]
        self._delete(doomed)

    def evict(self, key: str) -> int:
        """Remove checkpoint `key`; returns the bytes freed. Raises `PinnedError` if pinned."""
        with self._mutex:
            held = self._get(key)
            if held.pins:
                raise PinnedError(
                    f"checkpoint {key[:12]} is pinned {held.pins} time(s) in the {self.name} "
                    "tier (an instance is using it); stop the instance before evicting it."
                )
            del self._held[key]
            self._release(held.extents)
            doomed = [self._to_trash(self.root / key)]
            self._save()
        self._delete(doomed)
        return held.nbytes

    # -- use ----------------------------------------------------------------------------------

    def pin(self, key: str) -> Path:
        """Protect `key` from eviction (refcounted) and mark it used; returns its directory."""
        with self._mutex:
            held = self._get(key)
            held.pins += 1
            held.touch(self._clock())
            return self.root / key

    def unpin(self, key: str) -> None:
        """Undo one `pin`. Raises `NotPinnedError` if `key` has no pins left."""
        with self._mutex:
            held = self._get(key)
            if held.pins == 0:
                raise NotPinnedError(
                    f"checkpoint {key[:12]} is not pinned in the {self.name} tier; every unpin "
                    "must match an earlier pin (check the instance's lifecycle)."
                )
            held.pins -= 1

    def touch(self, key: str, source: str | None = None) -> Path:
        """Mark `key` used now (LRU), remembering `source` if given; returns its directory."""
        with self._mutex:
            if self._get(key).touch(self._clock(), source) and self._lock_fd is not None:
                self._save()
            return self.root / key

    def remember(self, key: str, source: str) -> None:
        """Record that `source` holds checkpoint `key` too, without marking it used (another
        tier served it). Does nothing if this tier does not hold `key`."""
        with self._mutex:
            held = self._held.get(key)
            if held is not None and self._lock_fd is not None and held.remember(source):
                self._save()

    def _get(self, key: str) -> Held:
        held = self._held.get(key)
        if held is None:
            raise NotHeldError(
                f"checkpoint {key[:12]} is not in the {self.name} tier; ensure() it first "
                "(it may have been evicted)."
            )
        return held

    # -- helpers ------------------------------------------------------------------------------

    def _to_trash(self, path: Path) -> Path:
        trash = self.root / TRASH
        trash.mkdir(exist_ok=True)
        target = trash / f"{path.name}.{os.getpid()}.{next(self._trash_seq)}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return target
        return target

    def _delete(self, paths: list[Path]) -> None:
        for path in paths:
            remove_tree(path)

    def _check_open(self) -> None:
        """Raise `StoreClosedError` once `close` has released the directory (call under the
        mutex): a fill finishing after shutdown must not write into another agent's tier."""
        if self._lock_fd is None:
            raise StoreClosedError(f"{self.name} tier at {self.root} is closed; nothing was added")

    def _release(self, extents: tuple[tuple[int, int], ...]) -> None:
        if extents and self.space is not None:
            self.space.release(extents)

    def _save(self, *, clean: bool = False) -> None:
        entries = [h.to_index() for h in self._held.values()]
        save_index(self.root, sorted(entries, key=lambda e: e.key), clean=clean)
