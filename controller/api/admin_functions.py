"""Admin API for functions: list, describe, deploy (`PUT` a spec) and delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from controller.api.body import json_body
from controller.api.deps import Ctl, require_admin
from controller.api.errors import ApiError
from controller.api.openai import function_named
from controller.describe import describe_function
from controller.spec import SpecError, spec_from_dict

router = APIRouter(prefix="/admin/functions", dependencies=[Depends(require_admin)])


@router.get("")
async def list_functions(controller: Ctl) -> dict[str, Any]:
    return {"functions": [describe_function(controller.state, f) for f in controller.functions()]}


@router.get("/{name}")
async def get_function(name: str, controller: Ctl) -> dict[str, Any]:
    return describe_function(controller.state, function_named(controller, name))


@router.put("/{name}")
async def put_function(name: str, request: Request, controller: Ctl) -> JSONResponse:
    """Deploy `name` from the spec in the body: 201 when new, 200 when replaced."""
    doc = await json_body(request)
    if not isinstance(doc, dict):
        raise ApiError(400, 'the body must be a function spec object, e.g. {"model": ...}.')
    try:
        spec = spec_from_dict(doc)
    except SpecError as exc:
        raise ApiError(422, f"invalid function spec: {exc}", code="invalid_spec") from None
    record, created = await controller.deploy(name, spec)
    body = describe_function(controller.state, record)
    return JSONResponse(body, status_code=201 if created else 200)


@router.delete("/{name}")
async def delete_function(name: str, controller: Ctl) -> dict[str, Any]:
    controller.delete(name)
    return {"deleted": name}
