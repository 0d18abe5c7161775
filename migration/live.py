"""Live migration of one in-flight request by its token-level state (ServerlessLLM's protocol,
with Llumnix's discipline about failures).

While the source instance keeps decoding and streaming to the client, the destination
recomputes the request's KV cache from its tokens in rounds, then takes over at a token
boundary:

    begin      the destination prefills prompt + every token emitted so far (emitting nothing)
    catch_up*  it prefills the tokens the source emitted during the previous round, one round
               at a time, until at most `follow_delta_tokens` remain (ServerlessLLM's 20);
               then it *follows*: every token the source emits is sent on as it arrives, so
               the destination computes each one while the source computes the next. Once an
               answer shows it at most `max_delta_tokens` behind, it is `ready`
    commit     ready, the stream asks the source to stop after the token it is computing
               (`CancelRequest.after_outputs`); the source emits it, finished `handed_over`,
               and runs no further step (on a shared machine it would slow the destination's).
               The destination gets that token (the KV of every one before it is there), runs
               it and samples the next in a single decode step, and the client's stream
               continues from it: the pause is one decode step and two hops, whatever the
               context length. A source that cannot be asked is cancelled at its next token
    abort      the destination's call is cancelled (its slot and KV freed on the node) and its
               slot here released; the source was never touched, so it just goes on

Sampling is deterministic per (seed, position), so the destination's tokens are the ones the
source would have produced: text and ids equal an unmigrated run's. Any token the source
computed but the controller never received is simply computed again by the destination.

`LiveMigration` drives the rounds in a task of its own; the `TokenStream` carrying the request
performs the hand-over itself (`TokenStream._hand_over`), so that switching calls happens
between two of the stream's events and never races its reads. This module never imports the
controller: the stream's host provides the destination call.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from migration.request import RequestState
from node_agent.proto import node_agent_pb2 as pb

log = logging.getLogger(__name__)

MigrateCall: TypeAlias = grpc.aio.StreamStreamCall[pb.MigrateFeed, pb.MigrateEvent]


@dataclass(frozen=True)
class MigrationConfig:
    """How rounds run."""

    max_delta_tokens: int = 1
    """Ready to hand over once the destination is at most this many tokens behind the
    source: they are computed after the source stopped, with the commit's token, so they are
    the pause (1: the one in flight while the destination follows)."""
    follow_delta_tokens: int = 20
    """Stop the rounds and follow token by token once at most this many remain
    (ServerlessLLM's bound); still more after `max_rounds` rounds: the destination is slower
    than the source, abort. Following, after `max_rounds` answers it hands over even if more
    than `max_delta_tokens` remain (a fast model, whose decode step is shorter than an
    answer's round trip, is always some tokens behind)."""
    max_rounds: int = 10
    """Answers (rounds, then followed tokens) before giving up (rounds) or handing over anyway
    (following)."""
    round_timeout_s: float = 60.0
    """How long one round (including round 0's prefill of the whole context) may take."""
    handover_timeout_s: float = 30.0
    """How long to wait for the source, with nothing in flight to the destination: for its
    next token to follow, or its stop to hand over at."""


class Reason(enum.StrEnum):
    """Why a request was moved (the `reason` label of `stoke_migrations_total`)."""

    ADMIN = "admin"
    DRAIN = "drain"
    SCALE_IN = "scale_in"
    LOCALITY = "locality"
    PREEMPTION = "preemption"


class Outcome(enum.StrEnum):
    """How a migration ended (the `outcome` label of `stoke_migrations_total`)."""

    COMPLETED = "completed"
    """Handed over: the destination generates now."""
    TAKEOVER = "takeover"
    """The source failed mid-migration; the destination took over from the recorded tokens."""
    ABORTED = "aborted"
    """The destination failed or was too slow; the source goes on untouched."""
    FINISHED = "finished"
    """The request ended on the source before the hand-over; nothing moved."""
    CANCELLED = "cancelled"
    """The client went away (or the request was otherwise closed); nothing moved."""

    @property
    def handed_over(self) -> bool:
        """The destination carries the request now."""
        return self in (Outcome.COMPLETED, Outcome.TAKEOVER)


class Phase(enum.Enum):
    ROUNDS = "rounds"  # one catch-up round at a time
    FOLLOW = "follow"  # every token the source emits is sent on as it arrives
    READY = "ready"  # at most max_delta_tokens behind: the source stops, then the commit
    DONE = "done"


@dataclass(frozen=True)
class MigrationReport:
    """What one migration did, for the log, the metrics and the admin API."""

    request_id: str
    reason: Reason
    source_node: str
    destination_node: str
    destination_instance: str
    outcome: Outcome
    rounds: int
    context_tokens: int
    """Prompt + output tokens the destination held at the hand-over (or at the abort)."""
    duration_s: float
    detail: str = ""
    pause_s: float | None = None
    """For a completed hand-over: from the source's last token reaching the client until the
    destination's first one did (the client-visible pause)."""
    ended_unix: float = 0.0
    """When it ended (unix time): the hand-over, or the abort."""
    destination_unreachable: bool = False
    """Aborted because the destination's node could not be reached (UNAVAILABLE)."""

    def to_json(self) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "reason": self.reason.value,
            "from": self.source_node,
            "to": self.destination_node,
            "instance": self.destination_instance,
            "outcome": self.outcome.value,
            "rounds": self.rounds,
            "context_tokens": self.context_tokens,
            "duration_s": round(self.duration_s, 4),
            "pause_s": None if self.pause_s is None else round(self.pause_s, 4),
            "ended_unix": round(self.ended_unix, 3),
            "detail": self.detail,
        }


class DestinationFailed(Exception):
    """The destination refused, failed or fell behind: abort and keep the source."""


_EOF = object()
FOLLOW_IN_FLIGHT = 3
"""Feeds a following migration may have unanswered at once."""


class LiveMigration:
    """One request's move to `destination_instance` (a slot there already held for it) over
    `call`, a `Migrate` call to its node.

    Paired verbs: `run` drives begin → catch_up* until the delta is small (`ready`); then the
    stream calls `commit` at a token boundary, or anyone calls `abort`. `done` resolves with
    the report at the commit or the abort. `run` is the call's only reader and writer: after
    the commit it forwards the destination's token events, which `tokens()` yields to the
    stream. `commit` and `abort` return without awaiting, so the stream's switch is atomic."""

    def __init__(
        self,
        request: RequestState,
        destination_instance: str,
        destination_node: str,
        call: MigrateCall,
        reason: Reason,
        config: MigrationConfig,
    ) -> None:
        self.request = request
        self.destination_instance = destination_instance
        self.destination_node = destination_node
        self.call = call
        self.reason = reason
        self.config = config
        self.source_node = request.node_id
        self.phase = Phase.ROUNDS
        self.rounds = 0
        self.sent = 0
        """Output tokens the destination has been sent so far."""
        self.computed = 0
        """Output tokens the destination has answered for (in its KV cache)."""
        self.prefilled = False
        """The destination has acknowledged round 0: it holds the request's KV."""
        self.on_ready: Callable[[], None] | None = None
        """Called once, when the migration becomes `ready` (the stream stops the source)."""
        self.done: asyncio.Future[MigrationReport] = asyncio.get_running_loop().create_future()
        self._started = time.monotonic()
        self._commit: pb.TokenIds | None = None
        self._committed = asyncio.Event()
        self._emitted = asyncio.Event()  # the source emitted a token (see `follow`)
        self._unreachable = False
        self._in_flight: list[int] = []  # following: where each unanswered feed ends
        self._tokens: asyncio.Queue[pb.TokenEvent | BaseException | object] = asyncio.Queue()

    @property
    def following(self) -> bool:
        """Each token the source emits goes on to the destination as it arrives."""
        return self.phase in (Phase.FOLLOW, Phase.READY)

    @property
    def ready(self) -> bool:
        """Caught up (at most `max_delta_tokens` behind, the destination idle): the stream
        should hand over at its next token."""
        return self.phase is Phase.READY

    # ---- the rounds (the task that owns the call) -------------------------------------------

    async def run(self) -> None:
        """Round 0, catch-up rounds until the delta is small, then wait for `commit`; after it,
        send the last delta and forward the destination's tokens. Before the commit any
        failure aborts (the source is untouched); after it, failures reach the stream."""
        try:
            begin = self.request.generate_request(self.destination_instance)
            self.sent = len(begin.output_ids)
            await self.call.write(pb.MigrateFeed(begin=begin))
            pending = asyncio.ensure_future(self.call.read())
            pending = await self._catch_up(pending)
            await self.call.write(pb.MigrateFeed(commit=self._commit))
            await self.call.done_writing()
            await self._forward(pending)
        except DestinationFailed as exc:
            self.abort(Outcome.ABORTED, str(exc))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            if self._commit is None:
                self._unreachable = (
                    isinstance(exc, grpc.aio.AioRpcError)
                    and exc.code() is grpc.StatusCode.UNAVAILABLE
                )
                self.abort(Outcome.ABORTED, f"the destination failed: {_brief(exc)}")
            else:
                self._tokens.put_nowait(exc)
        except asyncio.CancelledError:
            self.abort(Outcome.CANCELLED, "cancelled")
            self._tokens.put_nowait(_EOF)
            raise

    async def _catch_up(self, pending: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """Rounds, then following, until `commit`; returns the read in progress then (it
        belongs to the destination's token stream)."""
        answered = time.monotonic()
        while self._commit is None:
            behind = len(self.request.output_ids) - self.computed
            if self.phase is Phase.READY or self.sent == self.computed:  # nothing in flight
                timeout, what = self.config.handover_timeout_s, "the source emitted no token"
            else:
                timeout = self.config.round_timeout_s
                what = f"round {self.rounds} took over {timeout:.0f} s ({behind} tokens behind)"
            await self._wait(pending, answered + timeout - time.monotonic(), what)
            if self._commit is not None:
                break
            if pending.done():
                self._answered(pending.result())
                pending = asyncio.ensure_future(self.call.read())
                answered = time.monotonic()
                behind = len(self.request.output_ids) - self.computed
                await self._next_phase(behind)
            if self.following:
                self._emitted.clear()
                await self._send_on()
        return pending

    async def _send_on(self) -> None:
        """Following: send what the source emitted since the last feed, unless
        `FOLLOW_IN_FLIGHT` feeds are unanswered already (a fast model's tokens then go
        together in the next one, after an answer, rather than as hundreds of messages)."""
        self._in_flight = [end for end in self._in_flight if end > self.computed]
        if self.sent < len(self.request.output_ids) and len(self._in_flight) < FOLLOW_IN_FLIGHT:
            await self.call.write(pb.MigrateFeed(catch_up=self._delta()))
            self._in_flight.append(self.sent)

    async def _next_phase(self, behind: int) -> None:
        """After an answer `behind` tokens behind: the next round, following, or ready."""
        config = self.config
        if self.phase is Phase.ROUNDS:
            if behind <= config.max_delta_tokens:
                self._ready()  # nothing to follow
            elif behind <= config.follow_delta_tokens:
                self.phase = Phase.FOLLOW
                self._emitted.set()  # send what remains now
            elif self.rounds >= config.max_rounds:
                raise DestinationFailed(
                    f"still {behind} tokens behind after {self.rounds} rounds: the "
                    "destination is slower than the source"
                )
            else:
                await self.call.write(pb.MigrateFeed(catch_up=self._delta()))
        elif self.phase is Phase.FOLLOW and (
            behind <= config.max_delta_tokens or self.rounds >= config.max_rounds
        ):
            # After `max_rounds` answers it hands over however far behind: a fast model's
            # decode step is shorter than an answer's round trip, so it is always some tokens
            # behind; they go with the commit as one prefill chunk (a longer pause, but it
            # moves). A destination that stops answering times out instead.
            self._ready()

    def _ready(self) -> None:
        self.phase = Phase.READY
        self._emitted.set()  # send on what the source emitted meanwhile, now
        if self.on_ready is not None:
            self.on_ready()

    async def _wait(self, pending: asyncio.Future[Any], timeout: float, what: str) -> None:
        """Until `pending` is done, `commit` is called or (while following) the source emits;
        DestinationFailed(`what`) after `timeout` seconds of none of them."""
        waits = [asyncio.ensure_future(self._committed.wait())]
        if self.following:
            waits.append(asyncio.ensure_future(self._emitted.wait()))
        try:
            done, _ = await asyncio.wait(
                {pending, *waits}, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for wait in waits:
                wait.cancel()
        if not done and self._commit is None:
            raise DestinationFailed(what)

    def _answered(self, event: object) -> None:
        if event is grpc.aio.EOF or not isinstance(event, pb.MigrateEvent):
            raise DestinationFailed("the destination ended the call before catching up")
        if event.WhichOneof("kind") != "prefilled":
            raise DestinationFailed("the destination sent tokens before the commit")
        computed = event.prefilled - len(self.request.prompt_ids)
        if not self.computed <= computed <= self.sent:
            raise DestinationFailed(
                f"the destination answered for {computed} output tokens; it was sent {self.sent}"
            )
        self.computed = computed
        self.prefilled = True
        self.rounds += 1

    async def _forward(self, pending: asyncio.Future[Any]) -> None:
        """After the commit: the destination's token events, in order, to `tokens()`."""
        while True:
            event = await pending
            if event is grpc.aio.EOF:
                self._tokens.put_nowait(_EOF)
                return
            if event.WhichOneof("kind") == "token":
                self._tokens.put_nowait(event.token)
            pending = asyncio.ensure_future(self.call.read())

    def _delta(self) -> pb.TokenIds:
        delta = self.request.output_ids[self.sent :]
        self.sent = len(self.request.output_ids)
        return pb.TokenIds(ids=delta)

    # ---- the stream's side ----------------------------------------------------------------

    def follow(self) -> None:
        """The source emitted a token (appended to `request.output_ids`): while following, it
        is sent on to the destination at once (ready too: until the source stops, each token
        the destination computes beside it is one the commit does not carry)."""
        if self.following:
            self._emitted.set()

    def commit(self, outcome: Outcome = Outcome.COMPLETED) -> None:
        """The source has stopped after `request.output_ids`: the destination gets the last
        delta and generates from the next position (`tokens()`). Called by the stream at a
        token boundary, or when the source failed and the destination takes over."""
        assert self.prefilled and self.phase is not Phase.DONE, "nothing to commit"
        self._commit = self._delta()
        self._committed.set()
        self._end(outcome, f"last delta {len(self._commit.ids)} tokens")

    def abort(self, outcome: Outcome, detail: str) -> None:
        """Give up before the commit: cancel the destination's call (its node frees the
        request's slot and KV). Whoever holds the destination's slot releases it on `done`."""
        if self.phase is Phase.DONE:
            return
        self.call.cancel()
        self._end(outcome, detail)

    async def tokens(self) -> AsyncGenerator[pb.TokenEvent, None]:
        """After `commit`: the destination's token events, as a `Generate` call gives them;
        its failures raise as that call's would (`grpc.aio.AioRpcError`)."""
        while (item := await self._tokens.get()) is not _EOF:
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, pb.TokenEvent)
            yield item

    def cancel(self) -> None:
        """Stop the destination's generation (after the commit: the stream was closed)."""
        self.call.cancel()

    def _end(self, outcome: Outcome, detail: str) -> None:
        self.phase = Phase.DONE
        if not self.done.done():
            self.done.set_result(
                MigrationReport(
                    request_id=self.request.request_id,
                    reason=self.reason,
                    source_node=self.source_node,
                    destination_node=self.destination_node,
                    destination_instance=self.destination_instance,
                    outcome=outcome,
                    rounds=self.rounds,
                    context_tokens=len(self.request.prompt_ids) + self.sent,
                    duration_s=time.monotonic() - self._started,
                    detail=detail,
                    ended_unix=time.time(),
                    destination_unreachable=self._unreachable,
                )
            )


def _brief(exc: BaseException) -> str:
    """A gRPC error in one line (its repr spans several)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
