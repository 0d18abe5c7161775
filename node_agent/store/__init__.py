"""The node agent's tiered checkpoint store: DRAM (/dev/shm) and local disk under byte budgets,
LRU with pins, filled from S3 (parallel ranged GETs, CRC-checked, resumable) or local
directories (stoke checkpoints, or Hugging Face directories converted once).

Entry point: `CheckpointStore(StoreConfig(...))`, then `ensure(source, tier) -> path` for
`loader.load_state_dict(path)` (`ensure_with_origin` also says where the bytes came from).
`upload_checkpoint` pushes a checkpoint to S3. Every error raised on purpose is a `StoreError`
(errors.py; the base, and the errors the store shares with the controller, are in
`node_agent.facts.errors`, re-exported here). Tiers are `node_agent.facts.tiers.TierName`;
sources, sizes and the S3 client are facts too (`node_agent.facts`).
"""

from node_agent.facts.errors import InvalidSizeError, InvalidSourceError, RemoteError, StoreError
from node_agent.store.bandwidth import BandwidthMeter, measure_read_bandwidth
from node_agent.store.coalesce import SingleFlight
from node_agent.store.config import FetchConfig, StoreConfig
from node_agent.store.errors import (
    CorruptObjectError,
    NoRoomError,
    NotHeldError,
    NotPinnedError,
    PinnedError,
    ShortFileError,
    StoreClosedError,
    StoreLockedError,
    TooLargeError,
)
from node_agent.store.identity import checkpoint_key
from node_agent.store.origin import Ensured
from node_agent.store.s3fetch import FetchResult, S3Fetcher
from node_agent.store.stats import StoreStats
from node_agent.store.store import CheckpointStore
from node_agent.store.tier import Tier
from node_agent.store.tier_state import Holding, Reservation
from node_agent.store.upload import UploadResult, upload_checkpoint

__all__ = [
    "BandwidthMeter",
    "CheckpointStore",
    "CorruptObjectError",
    "Ensured",
    "FetchConfig",
    "FetchResult",
    "Holding",
    "InvalidSizeError",
    "InvalidSourceError",
    "NoRoomError",
    "NotHeldError",
    "NotPinnedError",
    "PinnedError",
    "RemoteError",
    "Reservation",
    "S3Fetcher",
    "ShortFileError",
    "SingleFlight",
    "StoreClosedError",
    "StoreConfig",
    "StoreError",
    "StoreLockedError",
    "StoreStats",
    "Tier",
    "TooLargeError",
    "UploadResult",
    "checkpoint_key",
    "measure_read_bandwidth",
    "upload_checkpoint",
]
