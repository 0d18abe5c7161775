"""Admin API for the node autoscaler: its pools, nodes, demand, held decisions and events
(`GET /admin/autoscaler`, `stoke autoscaler`), and what the cluster costs (`GET /admin/cost`,
`stoke cost`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from controller.api.deps import Ctl, require_admin
from controller.errors import AdminError

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

NOT_ON = (
    "the node autoscaler is off: start the controller with --autoscale POLICY.yaml "
    "(see deploy/local.yaml)"
)


@router.get("/autoscaler")
async def autoscaler(controller: Ctl) -> dict[str, Any]:
    if controller.elastic is None:
        raise AdminError(409, NOT_ON, "autoscaler_off")
    return controller.elastic.report()


@router.get("/cost")
async def cost(controller: Ctl) -> dict[str, Any]:
    if controller.elastic is None:
        raise AdminError(409, NOT_ON, "autoscaler_off")
    return controller.elastic.cost()
