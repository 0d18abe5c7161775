"""For operators: `/healthz` (no key) and Prometheus `/metrics` (admin key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from controller.api.deps import Ctl, require_admin

router = APIRouter()


@router.get("/healthz")
async def healthz(controller: Ctl) -> dict[str, Any]:
    alive = sum(n.alive for n in controller.state.nodes.values())
    return {"status": "ok", "nodes_alive": alive, "functions": len(controller.functions())}


@router.get("/metrics", dependencies=[Depends(require_admin)])
async def metrics(controller: Ctl) -> Response:
    return Response(controller.metrics.render(), media_type="text/plain; version=0.0.4")
