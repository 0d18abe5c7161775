"""Cluster commands over the controller's HTTP API: `stoke deploy`, `list`, `status`, `delete`,
`nodes` and `invoke`. They read `$STOKE_URL` and `$STOKE_API_KEY` (or what `stoke up` saved)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node_agent.facts.units import format_size
from stoke.commands.sampling_options import add_options, given

_ENV_NOTE = (
    " Talks to the controller at $STOKE_URL with $STOKE_API_KEY (defaults: what `stoke up` "
    "saved under $STOKE_HOME or ~/.stoke)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    deploy = subparsers.add_parser(
        "deploy",
        help="deploy (or update) a model as a function",
        description=(
            "Deploy MODEL as function NAME, or update NAME if it exists. --config is a function "
            "spec (YAML: model, resources, autoscaling, generation, engine); --model overrides "
            "its model. A local path is made absolute and read by the nodes from there (a "
            "Hugging Face directory is converted once); s3://bucket/prefix is fetched by the "
            "nodes." + _ENV_NOTE
        ),
    )
    deploy.add_argument("name", metavar="NAME")
    deploy.add_argument(
        "--model",
        help="checkpoint directory, HF directory, .gguf file (converted once, on this machine, "
        "into ~/.cache/stoke/gguf) or s3://bucket/prefix",
    )
    deploy.add_argument("--config", type=Path, help="function spec file (YAML)")
    deploy.add_argument("--json", action="store_true", help="print the function as JSON")
    deploy.set_defaults(func=run_deploy)

    listing = subparsers.add_parser(
        "list", help="list functions", description="List deployed functions." + _ENV_NOTE
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_list)

    status = subparsers.add_parser(
        "status",
        help="show one function",
        description="Show a function and its instances." + _ENV_NOTE,
    )
    status.add_argument("name", metavar="NAME")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=run_status)

    delete = subparsers.add_parser(
        "delete",
        help="delete a function",
        description="Delete a function; its instances stop once their requests finish." + _ENV_NOTE,
    )
    delete.add_argument("name", metavar="NAME")
    delete.set_defaults(func=run_delete)

    nodes = subparsers.add_parser(
        "nodes",
        help="list nodes",
        description="List node agents, their tiers and instances." + _ENV_NOTE,
    )
    nodes.add_argument("--json", action="store_true", help="print JSON")
    nodes.set_defaults(func=run_nodes)

    drain = subparsers.add_parser(
        "drain",
        help="stop scheduling onto a node",
        description=(
            "Drain node NODE: it takes no new instances, its instances take no new requests, "
            "its running requests move to other nodes now by live migration (their streams go "
            "on), and its instances stop once empty; new requests go to other nodes. With "
            "--wait, running requests finish where they are instead." + _ENV_NOTE
        ),
    )
    drain.add_argument("node", metavar="NODE", help="node id, as `stoke nodes` lists it")
    drain.add_argument(
        "--wait",
        action="store_true",
        help="let running requests finish on the node instead of migrating them",
    )
    drain.set_defaults(func=run_drain)

    undrain = subparsers.add_parser(
        "undrain",
        help="schedule onto a drained node again",
        description=(
            "Undo `stoke drain NODE`: the node takes new instances and requests again. Instances "
            "the drain stopped are not restarted; new ones start there as traffic asks." + _ENV_NOTE
        ),
    )
    undrain.add_argument("node", metavar="NODE", help="node id, as `stoke nodes` lists it")
    undrain.set_defaults(func=run_undrain)

    invoke = subparsers.add_parser(
        "invoke",
        help="call a function",
        description=(
            "Send PROMPT to function NAME (as a chat message with --chat) and print the text; "
            "on stderr, where it ran: cold or warm start, node, tier, load time." + _ENV_NOTE
        ),
    )
    invoke.add_argument("name", metavar="NAME")
    invoke.add_argument("prompt", metavar="PROMPT")
    invoke.add_argument("--max-tokens", type=int, help="tokens to generate (function default)")
    invoke.add_argument("--temperature", type=float, help="0 = greedy (function default)")
    invoke.add_argument("--top-p", type=float, help="nucleus sampling (function default)")
    invoke.add_argument("--seed", type=int, help="sampling seed")
    invoke.add_argument("--stop", action="append", help="stop string (repeatable)")
    add_options(invoke)
    invoke.add_argument("--chat", action="store_true", help="send PROMPT as a user message")
    invoke.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    invoke.add_argument("--json", action="store_true", help="print the response and facts as JSON")
    invoke.set_defaults(func=run_invoke)


def _client() -> Any:
    from stoke.client import Client

    return Client.from_env()


def run_deploy(args: argparse.Namespace) -> int:
    from controller.spec import SpecError, load_spec
    from stoke.errors import StokeError
    from stoke.gguf_cache import model_path

    model = args.model
    if model is not None and "://" not in model:
        model = str(Path(model).expanduser().resolve())
    try:
        spec = load_spec(args.config, model=model, source_name=str(args.config or "--model"))
    except SpecError as exc:
        raise StokeError(str(exc)) from None
    doc = spec.to_dict()
    if "://" not in doc["model"] and args.config is not None:
        doc["model"] = str((args.config.parent / doc["model"]).expanduser().resolve())
    doc["model"] = model_path(doc["model"])  # a .gguf file: its checkpoint (converted once)
    started = time.perf_counter()
    result = _client().call("PUT", f"/admin/functions/{args.name}", doc)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        seconds = time.perf_counter() - started
        size, memory = (
            format_size(result["checkpoint_bytes"], 1),
            format_size(result["memory_bytes"], 1),
        )
        print(
            f"deployed {result['name']}: {result['model']} ({size}, {memory} per instance) "
            f"in {seconds:.1f} s"
        )
    return 0


def run_list(args: argparse.Namespace) -> int:
    functions = _client().call("GET", "/admin/functions")["functions"]
    if args.json:
        print(json.dumps(functions, indent=1))
        return 0
    if not functions:
        print("no functions; deploy one with `stoke deploy NAME --model MODEL`")
        return 0
    rows = [("NAME", "INSTANCES", "IN FLIGHT", "MODEL")]
    for f in functions:
        ready = sum(i["state"] == "ready" for i in f["instances"])
        rows.append((f["name"], f"{ready}/{len(f['instances'])}", str(f["in_flight"]), f["model"]))
    _table(rows)
    return 0


def run_status(args: argparse.Namespace) -> int:
    f = _client().call("GET", f"/admin/functions/{args.name}")
    if args.json:
        print(json.dumps(f, indent=1))
        return 0
    scale = f["spec"]["autoscaling"]
    print(f"{f['name']}: {f['model']}")
    size, memory = (
        format_size(f["checkpoint_bytes"], 1),
        format_size(f["memory_bytes"], 1),
    )
    print(f"  checkpoint {size}, {memory} per instance, context {f['context_length']}")
    print(
        f"  autoscaling: {scale['min_instances']}..{scale['max_instances']} instances, "
        f"target concurrency {scale['target_concurrency']}, keep-alive {_keep_alive(scale)}"
    )
    print(f"  in flight {f['in_flight']}, queued {f['queued']}")
    if not f["instances"]:
        print("  no instances (scaled to zero)")
    for i in f["instances"]:
        load = f", loaded in {i['load_ms']:.0f} ms" if i["load_ms"] is not None else ""
        print(
            f"  {i['instance_id']} on {i['node']}: {i['state']}, {i['in_flight']} in flight{load}"
        )
    return 0


def run_delete(args: argparse.Namespace) -> int:
    _client().call("DELETE", f"/admin/functions/{args.name}")
    print(f"deleted {args.name}")
    return 0


def run_nodes(args: argparse.Namespace) -> int:
    nodes = _client().call("GET", "/admin/nodes")["nodes"]
    if args.json:
        print(json.dumps(nodes, indent=1))
        return 0
    if not nodes:
        print("no nodes have registered; start one with `stoke node --controller HOST:PORT`")
    for n in nodes:
        state = "alive" if n["alive"] else "gone"
        preemption = n.get("preemption")
        if preemption is not None and preemption["deadline_in_s"] is not None:
            left = max(preemption["deadline_in_s"], 0)
            state += f", preempting (deadline in {left:.0f} s; {preemption['source']})"
            if preemption.get("drained"):
                state += ", drained"
        elif n["draining"]:
            state += ", draining"
        if preemption is not None and preemption["deadline_in_s"] is None:
            state += f", {preemption['source']} {preemption['kind']} recommended"
        used, total = (
            format_size(n["memory_reserved_bytes"], 1),
            format_size(n["memory_total_bytes"], 1),
        )
        print(
            f"{n['node_id']} ({n['address']}, {state}): memory {used} / {total}, "
            f"slots {n['slots_used']}/{n['slots_total']}"
        )
        for t in n["tiers"]:
            held = ", ".join(_holding(h) for h in t["holdings"]) or "-"
            print(f"  {t['tier']:<5} {format_size(t['budget_bytes'], 1)}: {held}")
            if (arena := t.get("arena")) is not None:
                print(f"        {_arena(arena)}")
        bw = ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in sorted(n["bandwidths"].items()))
        if bw:
            print(f"  bandwidth: {bw}")
        for i in n["instances"]:
            print(f"  instance {i['instance_id']}: {i['state']}, {i['in_flight']} in flight")
    return 0


def _arena(arena: dict[str, Any]) -> str:
    """The memory a DRAM tier holds whatever it caches (allocated when the node started)."""
    started = f", faulted in at start in {arena['startup_s']:.1f} s" if arena["startup_s"] else ""
    return (
        f"arena {format_size(arena['size_bytes'], 1)} of memory in {arena['path']}: "
        f"{format_size(arena['free_bytes'], 1)} free, largest free extent "
        f"{format_size(arena['largest_free_bytes'], 1)}{started}"
    )


def run_drain(args: argparse.Namespace) -> int:
    query = "?migrate=false" if args.wait else ""
    reply = _client().call("POST", f"/admin/nodes/{args.node}/drain{query}")
    moved = [m for m in reply.get("migrations", []) if m["outcome"] in ("completed", "takeover")]
    if moved:
        print(f"moved {len(moved)} running request(s) off {reply['node_id']}")
    print(f"draining {reply['node_id']}: {reply['in_flight']} request(s) still running there")
    return 0


def run_undrain(args: argparse.Namespace) -> int:
    reply = _client().call("POST", f"/admin/nodes/{args.node}/undrain")
    print(f"{reply['node_id']} takes new instances and requests again")
    return 0


def _holding(h: dict[str, Any]) -> str:
    """One held checkpoint: every source known to hold it (`a = b`: the same bytes), its size."""
    sources = h.get("sources") or [h["source"]]
    return f"{' = '.join(sources) or h['key'][:12]} ({format_size(h['bytes'], 1)})"


def run_invoke(args: argparse.Namespace) -> int:
    from stoke.client import Client

    client = Client.from_env(role="invoke_key")
    body: dict[str, Any] = {"model": args.name, "stream": args.stream}
    for key in ("max_tokens", "temperature", "top_p", "seed", "stop"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    body.update(_http_options(given(args), args.chat))
    if args.n != 1:
        body["n"] = args.n
    if args.chat:
        body["messages"] = [{"role": "user", "content": args.prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = args.prompt
        path = "/v1/completions"
    started = time.perf_counter()
    if args.stream:
        return _invoke_stream(client, path, body, args, started)
    response = client._http.post(path, json=body)
    from stoke.client import _raise_for

    _raise_for(response)
    doc = response.json()
    texts = [c["message"]["content"] if args.chat else c["text"] for c in doc["choices"]]
    choice = doc["choices"][0]
    facts = _facts(dict(response.headers), time.perf_counter() - started)
    if args.json:
        print(
            json.dumps(
                {
                    "text": texts[0],
                    "finish_reason": choice["finish_reason"],
                    "usage": doc["usage"],
                    **({"logprobs": choice["logprobs"]} if choice.get("logprobs") else {}),
                    **({"choices": doc["choices"]} if len(texts) > 1 else {}),
                    **facts,
                },
                indent=1,
            )
        )
    else:
        for index, text in enumerate(texts):
            if len(texts) > 1:
                print(f"--- choice {index}")
            print(text)
        _print_facts(facts)
    return 0


def _http_options(options: dict[str, Any], chat: bool) -> dict[str, Any]:
    """The shared flags as the HTTP API's fields (chat asks for logprobs as a flag plus
    `top_logprobs`; JSON object keys are strings)."""
    if "logit_bias" in options:
        options["logit_bias"] = {str(k): v for k, v in options["logit_bias"].items()}
    if chat and "logprobs" in options:
        options["top_logprobs"] = options.pop("logprobs")
        options["logprobs"] = True
    return options


def _invoke_stream(
    client: Any, path: str, body: dict[str, Any], args: argparse.Namespace, started: float
) -> int:
    headers: dict[str, str] = {}
    first: float | None = None
    several = body.get("n", 1) > 1
    for got, event in client.stream(path, body):
        headers = got
        for choice in event.get("choices", []):
            text = choice.get("delta", {}).get("content") if args.chat else choice.get("text")
            if text:
                first = first or time.perf_counter()
                # several choices interleave: each piece on its own line, marked with its index
                sys.stdout.write(f"[{choice['index']}] {text}\n" if several else text)
                sys.stdout.flush()
    print()
    facts = _facts(headers, time.perf_counter() - started)
    if first is not None:
        facts["ttft_ms"] = round((first - started) * 1000, 1)
    if args.json:
        print(json.dumps(facts, indent=1))
    else:
        _print_facts(facts)
    return 0


def _facts(headers: dict[str, str], seconds: float) -> dict[str, Any]:
    return {
        "cold_start": headers.get("x-stoke-cold-start") == "true",
        "node": headers.get("x-stoke-node"),
        "tier": headers.get("x-stoke-tier") or None,
        "load_ms": float(headers.get("x-stoke-load-ms") or 0),
        "total_ms": round(seconds * 1000, 1),
    }


def _print_facts(facts: dict[str, Any]) -> None:
    start = (
        f"cold start from {facts['tier']} on {facts['node']}, load {facts['load_ms']:.0f} ms"
        if facts["cold_start"]
        else f"warm on {facts['node']}"
    )
    print(f"[{start}; total {facts['total_ms']:.0f} ms]", file=sys.stderr)


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _keep_alive(scale: dict[str, Any]) -> str:
    """`300 s`, or `adaptive (fallback 300 s)`."""
    from controller.spec import DEFAULT_KEEP_ALIVE_S

    if scale["keep_alive"] == "adaptive":
        fallback = scale.get("keep_alive_fallback") or DEFAULT_KEEP_ALIVE_S
        return f"adaptive (fallback {fallback:g} s)"
    return f"{scale['keep_alive']:g} s"
