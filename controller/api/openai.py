"""The OpenAI-compatible API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

The two invocation endpoints are also called straight from `HotPath` (past FastAPI's routing
and middleware), so they take their `ApiContext` as a plain argument and check the key
themselves instead of through a dependency.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from controller.api.body import parse_body
from controller.api.deps import Context, require_invoke
from controller.api.errors import ApiError
from controller.api.invoke import invoke
from controller.errors import unknown_function
from controller.registry import FunctionRecord
from controller.schemas import ChatCompletionRequest, CompletionRequest
from controller.service import Controller
from node_agent.facts.errors import TokenizerError

router = APIRouter(prefix="/v1")


@router.get("/models", dependencies=[Depends(require_invoke)])
async def list_models(context: Context) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(f) for f in context.controller.functions()]}


@router.get("/models/{name}", dependencies=[Depends(require_invoke)])
async def get_model(name: str, context: Context) -> dict[str, Any]:
    return _model_card(function_named(context.controller, name))


@router.post("/completions")
async def completions(request: Request, context: Context) -> Response:
    context.check_invoke(request)
    body = await parse_body(request, CompletionRequest)
    fn = function_named(context.controller, body.model)
    _refuse_unsupported(body)
    if body.prompt_count() != 1:
        raise ApiError(400, "prompt: send one prompt per request.", param="prompt")
    prompt_ids = _prompt_ids(fn, body.prompt_input())
    return await invoke(
        context.controller, request, fn, body, prompt_ids, body.max_tokens, chat=False
    )


@router.post("/chat/completions")
async def chat_completions(request: Request, context: Context) -> Response:
    context.check_invoke(request)
    body = await parse_body(request, ChatCompletionRequest)
    fn = function_named(context.controller, body.model)
    _refuse_unsupported(body)
    prompt_ids = _chat_prompt_ids(fn, body)
    return await invoke(
        context.controller, request, fn, body, prompt_ids, body.wanted_tokens(), chat=True
    )


HOT_ROUTES = {"/v1/completions": completions, "/v1/chat/completions": chat_completions}
"""The endpoints `HotPath` serves itself for `POST`, by path."""


def function_named(controller: Controller, name: str) -> FunctionRecord:
    """The deployed function `name`; 404 `model_not_found` when there is none."""
    fn = controller.function(name)
    if fn is None:
        raise ApiError(404, unknown_function(name), code="model_not_found", param="model")
    return fn


def _model_card(fn: FunctionRecord) -> dict[str, Any]:
    return {"id": fn.name, "object": "model", "created": int(fn.created_at), "owned_by": "stoke"}


def _refuse_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    """400 naming the first field stoke cannot honour (`controller.openai_fields`)."""
    problem = body.unsupported()
    if problem is not None:
        param, message = problem
        raise ApiError(400, message, param=param, code="unsupported_parameter")


def _prompt_ids(fn: FunctionRecord, prompt: str | list[int]) -> list[int]:
    """A text prompt tokenized; token ids checked against the vocabulary."""
    tokenizer = fn.model.tokenizer
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    prompt_ids = list(prompt)
    if any(not 0 <= t < tokenizer.vocab_size for t in prompt_ids):
        raise ApiError(400, f"prompt: token ids must be in [0, {tokenizer.vocab_size}).")
    return prompt_ids


def _chat_prompt_ids(fn: FunctionRecord, body: ChatCompletionRequest) -> list[int]:
    """The messages rendered with the model's chat template, tokenized."""
    tokenizer = fn.model.tokenizer
    if not tokenizer.has_chat_template:
        raise ApiError(
            400,
            f"model {fn.name} has no chat template; use /v1/completions with a plain prompt.",
            code="no_chat_template",
        )
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages)
    except TokenizerError as exc:
        raise ApiError(400, f"messages: {exc}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)
