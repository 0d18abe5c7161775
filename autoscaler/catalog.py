"""The price catalog stoke ships (`autoscaler/data/prices.csv`): USD per node-hour, one row per
instance type and market, each with its source and date. A pool's own `price_per_hour` wins;
the catalog is for when it is not given. Spot prices move by the hour and by zone: the catalog's
are typical values, so give `price_per_hour` where you know yours."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

COLUMNS = ("instance_type", "market", "price_per_hour", "source", "date")


class CatalogError(ValueError):
    """A price catalog row is unusable; the message names the row."""


@dataclass(frozen=True, slots=True)
class PriceRow:
    instance_type: str
    market: str
    price_per_hour: float
    source: str
    date: str


class Catalog:
    def __init__(self, rows: list[PriceRow]) -> None:
        self.rows = {(r.instance_type, r.market): r for r in rows}

    def find(self, instance_type: str, market: str) -> PriceRow | None:
        return self.rows.get((instance_type, str(market)))


def parse_catalog(text: str, source: str = "prices.csv") -> Catalog:
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise CatalogError(f"{source}: expected the columns {', '.join(COLUMNS)}")
    rows = []
    for n, raw in enumerate(reader, start=2):
        try:
            price = float(raw["price_per_hour"])
        except ValueError:
            raise CatalogError(f"{source} line {n}: price_per_hour is not a number") from None
        if price < 0 or raw["market"] not in ("spot", "on_demand"):
            raise CatalogError(f"{source} line {n}: a price >= 0 and market spot or on_demand")
        rows.append(
            PriceRow(raw["instance_type"], raw["market"], price, raw["source"], raw["date"])
        )
    return Catalog(rows)


def load_catalog(path: Path | None = None) -> Catalog:
    """The shipped catalog, or the CSV at `path`."""
    if path is not None:
        return parse_catalog(path.read_text(), str(path))
    text = resources.files("autoscaler").joinpath("data/prices.csv").read_text()
    return parse_catalog(text)
