"""Sampling defaults a model ships in generation_config.json (what `generate` uses if unset)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """temperature/top_p/top_k from generation_config.json; greedy unless it sets do_sample."""
    path = Path(model_dir) / "generation_config.json"
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raw = {}
    if not raw.get("do_sample"):
        return {"temperature": 0.0}
    defaults = {"temperature": float(raw.get("temperature", 1.0))}
    if "top_p" in raw:
        defaults["top_p"] = float(raw["top_p"])
    if "top_k" in raw:
        defaults["top_k"] = int(raw["top_k"])
    return defaults
