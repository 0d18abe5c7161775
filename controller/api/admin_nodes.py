"""Admin API for nodes: list them, drain one, undrain it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from controller.api.deps import Ctl, require_admin
from controller.describe import describe_nodes

router = APIRouter(prefix="/admin/nodes", dependencies=[Depends(require_admin)])


@router.get("")
async def list_nodes(controller: Ctl) -> dict[str, Any]:
    return {"nodes": describe_nodes(controller.state)}


@router.post("/{node_id}/drain")
async def drain(node_id: str, controller: Ctl, migrate: bool = True) -> dict[str, Any]:
    """`?migrate=false`: running requests finish on the node instead of moving now."""
    return await controller.draining.drain(node_id, migrate=migrate)


@router.post("/{node_id}/undrain")
async def undrain(node_id: str, controller: Ctl) -> dict[str, Any]:
    return await controller.draining.undrain(node_id)
