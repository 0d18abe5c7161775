"""Preemption-notice sources: AWS IMDS, GCP metadata, Azure Scheduled Events and SIGTERM.

The node agent picks one with `make_source` (or `make_source("auto")`, which asks `detect`),
iterates its `watch()` in the event loop, reports each `Notice` to the controller, and calls
`acknowledge` once it has drained. This package imports only the standard library and httpx2:
it sits below the node agent.
"""

from spot.notices.auto import SOURCE_NAMES, AutoSource, detect, make_source
from spot.notices.aws import AwsSource
from spot.notices.azure import AzureSource
from spot.notices.base import Notice, NoticeKind, NoticeSource
from spot.notices.gcp import GcpSource
from spot.notices.sigterm import SigtermSource

__all__ = [
    "SOURCE_NAMES",
    "AutoSource",
    "AwsSource",
    "AzureSource",
    "GcpSource",
    "Notice",
    "NoticeKind",
    "NoticeSource",
    "SigtermSource",
    "detect",
    "make_source",
]
