"""Admin API for running requests: list them (where each runs now), and move them by live
migration — one request, or every request of an instance."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from controller.api.deps import Ctl, require_admin
from controller.errors import AdminError
from migration.live import Reason

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class MigrateBody(BaseModel):
    """Where to move to (optional): `{"to": "node-1"}`."""

    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(None, description="A node id; default: where placement says.")


@router.get("/requests")
async def list_requests(controller: Ctl) -> dict[str, Any]:
    now = time.monotonic()
    out = []
    for rid, stream in sorted(controller.router.streams.items()):
        request, inst, moving = stream.request, stream.instance, stream.migration
        out.append(
            {
                "request_id": rid,
                "function": request.function,
                "node": inst.node_id if inst else None,
                "instance": inst.instance_id if inst else None,
                "prompt_tokens": len(request.prompt_ids),
                "output_tokens": len(request.output_ids),
                "max_tokens": request.params.max_tokens,
                "age_s": round(now - request.started_at, 3),
                "migrating_to": moving.destination_node if moving else None,
                "migration_phase": moving.phase.value if moving else None,
            }
        )
    return {"requests": out}


@router.get("/migrations")
async def recent_migrations(controller: Ctl) -> dict[str, Any]:
    return {"migrations": [r.to_json() for r in controller.migrator.recent]}


@router.post("/requests/{request_id}/migrate")
async def migrate_request(
    request_id: str, controller: Ctl, body: MigrateBody | None = None
) -> dict[str, Any]:
    to = body.to if body else None
    report = await controller.migrator.migrate_request(request_id, Reason.ADMIN, to)
    return report.to_json()


@router.post("/instances/{instance_id}/migrate")
async def migrate_instance(
    instance_id: str, controller: Ctl, body: MigrateBody | None = None
) -> dict[str, Any]:
    if instance_id not in controller.state.instances:
        raise AdminError(
            404, f"no instance {instance_id!r}; see `stoke status FUNCTION` for its instances."
        )
    running = controller.migrator.streams_on(instance_id=instance_id)
    to = body.to if body else None
    return {
        "instance": instance_id,
        "migrations": await controller.migrator.migrate_many(running, Reason.ADMIN, to),
    }
