"""The node agent's tiered checkpoint store: DRAM (/dev/shm) and local disk under byte budgets,
LRU with pins, filled from S3 (parallel ranged GETs, CRC-checked, resumable) or local
directories (stoke checkpoints, or Hugging Face directories converted once).

Entry point: `CheckpointStore(StoreConfig(...))`, then `ensure(source, tier) -> path` for
`loader.load_state_dict(path)` (`ensure_with_origin` also says where the bytes came from).
`upload_checkpoint` pushes a checkpoint to S3. Every error raised on purpose is a `StoreError`
(errors.py).
"""

from node_agent.store.bandwidth import BandwidthMeter, measure_read_bandwidth
from node_agent.store.coalesce import SingleFlight
from node_agent.store.config import FetchConfig, StoreConfig, TierName
from node_agent.store.errors import (
    CorruptObjectError,
    InvalidSizeError,
    InvalidSourceError,
    NoRoomError,
    NotHeldError,
    NotPinnedError,
    PinnedError,
    RemoteError,
    ShortFileError,
    StoreClosedError,
    StoreError,
    StoreLockedError,
    TooLargeError,
)
from node_agent.store.identity import checkpoint_key
from node_agent.store.origin import Ensured, Origin
from node_agent.store.s3fetch import FetchResult, S3Fetcher
from node_agent.store.sizes import format_size, parse_size
from node_agent.store.sources import LocalSource, S3Source, Source, parse_source
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
    "LocalSource",
    "NoRoomError",
    "NotHeldError",
    "NotPinnedError",
    "Origin",
    "PinnedError",
    "RemoteError",
    "Reservation",
    "S3Fetcher",
    "S3Source",
    "ShortFileError",
    "SingleFlight",
    "Source",
    "StoreClosedError",
    "StoreConfig",
    "StoreError",
    "StoreLockedError",
    "StoreStats",
    "Tier",
    "TierName",
    "TooLargeError",
    "UploadResult",
    "checkpoint_key",
    "format_size",
    "measure_read_bandwidth",
    "parse_size",
    "parse_source",
    "upload_checkpoint",
]
