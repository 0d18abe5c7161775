"""Live migration of one in-flight request by its token-level state (ServerlessLLM's protocol,
with Llumnix's discipline about failures).

While the source instance keeps decoding and streaming to the client, the destination
recomputes the request's KV cache from its tokens in rounds, then takes over at a token
boundary:

    begin      the destination prefills prompt + every token emitted so far (emitting nothing)
    catch_up*  it prefills the tokens the source emitted during the previous round; the rounds
               stop once the remaining delta is at most `max_delta_tokens` (or abort after
               `max_rounds`: the destination cannot keep up)
    commit     at the next token the source emits, the stream stops reading the source, cancels
               its call and sends the destination the last delta; the destination generates
               from the next position and the client's stream continues from it
    abort      the destination's call is cancelled (its slot and KV freed on the node) and its
               slot here released; the source was never touched, so it just goes on

Sampling is deterministic per (seed, position), so the destination's tokens are the ones the
source would have produced: text and ids equal an unmigrated run's. Any token the source
computed but the controller never received is simply computed again by the destination.

`LiveMigration` drives the rounds in a task of its own; the `TokenStream` carrying the request
performs the hand-over itself (`TokenStream.hand_over`), so that switching calls happens
between two of the stream's events and never races its reads. This module never imports the
controller: the stream's host provides the destination call.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass
from typing import TypeAlias

import grpc

from migration.request import RequestState
from node_agent.proto import node_agent_pb2 as pb

log = logging.getLogger(__name__)

MigrateCall: TypeAlias = grpc.aio.StreamStreamCall[pb.MigrateFeed, pb.MigrateEvent]


@dataclass(frozen=True)
class MigrationConfig:
    """How rounds run. The defaults follow ServerlessLLM's (a final delta of 20 tokens)."""

    max_delta_tokens: int = 20
    """Hand over once at most this many tokens remain for the destination to catch up."""
    max_rounds: int = 10
    """Catch-up rounds before giving up (the destination is slower than the source)."""
    round_timeout_s: float = 60.0
    """How long one round (including round 0's prefill of the whole context) may take."""
    handover_timeout_s: float = 30.0
    """How long to wait for the source's next token to hand over at."""


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


class Phase(enum.Enum):
    ROUNDS = "rounds"
    READY = "ready"  # caught up: hand over at the source's next token
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
            "detail": self.detail,
        }


class DestinationFailed(Exception):
    """The destination refused, failed or fell behind: abort and keep the source."""


class LiveMigration:
    """One request's move to `destination` (a slot there already held for it) over `call`.

    Paired verbs: `run` (begin → catch_up* → ready) then the stream's `commit`, or `abort`.
    `done` resolves with the report however it ends. Everything happens on the event loop;
    `commit` and `abort` return without awaiting, so the stream's switch is atomic."""

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
        self.prefilled = False
        """The destination has acknowledged at least round 0 (it holds the request)."""
        self.done: asyncio.Future[MigrationReport] = asyncio.get_running_loop().create_future()
        self._started = time.monotonic()
        self._commit_write: asyncio.Future[None] | None = None

    # ---- rounds ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Round 0, then catch-up rounds until the delta is small; then wait for the stream to
        commit. Any destination failure aborts (the source is untouched)."""
        try:
            await self._round(
                pb.MigrateFeed(begin=self.request.generate_request(self.destination_instance))
            )
            while len(self.request.output_ids) - self.sent > self.config.max_delta_tokens:
                if self.rounds >= self.config.max_rounds:
                    raise DestinationFailed(
                        f"still {len(self.request.output_ids) - self.sent} tokens behind after "
                        f"{self.rounds} rounds: the destination is slower than the source"
                    )
                await self._round(pb.MigrateFeed(catch_up=self._delta()))
            self.phase = Phase.READY
            await asyncio.wait_for(asyncio.shield(self.done), self.config.handover_timeout_s)
        except DestinationFailed as exc:
            self.abort(Outcome.ABORTED, str(exc))
        except TimeoutError:
            self.abort(Outcome.ABORTED, "the source emitted no token to hand over at")
        except asyncio.CancelledError:
            self.abort(Outcome.CANCELLED, "cancelled")
            raise

    async def _round(self, message: pb.MigrateFeed) -> None:
        """Send one round and wait until the destination has prefilled it."""
        sent = len(self.request.output_ids)
        try:
            await self.call.write(message)
            event = await asyncio.wait_for(self.call.read(), self.config.round_timeout_s)
        except TimeoutError:
            raise DestinationFailed(
                f"round {self.rounds} took over {self.config.round_timeout_s:.0f} s"
            ) from None
        except grpc.aio.AioRpcError as exc:
            raise DestinationFailed(f"{exc.code().name}: {exc.details()}") from None
        except asyncio.InvalidStateError as exc:  # the call ended under us
            raise DestinationFailed(f"the destination's call ended: {exc}") from None
        if event is grpc.aio.EOF or event.WhichOneof("kind") != "prefilled":
            raise DestinationFailed("the destination ended the call before catching up")
        self.sent, self.prefilled = sent, True
        self.rounds += 1

    def _delta(self) -> pb.TokenIds:
        delta = self.request.output_ids[self.sent :]
        self.sent = len(self.request.output_ids)
        return pb.TokenIds(ids=delta)

    # ---- the stream's side ----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Caught up: the stream should hand over at its next token."""
        return self.phase is Phase.READY

    def commit(self, outcome: Outcome = Outcome.COMPLETED) -> None:
        """The source has stopped after `request.output_ids`: send the destination the last
        delta; from now on the destination's call carries the request. Called by the stream
        (also when the source failed and the destination takes over)."""
        assert self.prefilled and self.phase is not Phase.DONE, "nothing to commit"
        delta = self._delta()
        # The write is queued on the call (grpc.aio keeps order); its failure shows up as a
        # failure of the stream's next read, which resumes the request the usual way.
        self._commit_write = asyncio.ensure_future(
            _write_quietly(self.call, pb.MigrateFeed(commit=delta))
        )
        self._end(outcome, f"delta {len(delta.ids)} tokens")

    def abort(self, outcome: Outcome, detail: str) -> None:
        """Give up: cancel the destination's call (the node frees its slot and KV). The caller
        (the stream's host) releases the destination's slot when `done` resolves."""
        if self.phase is Phase.DONE:
            return
        self.call.cancel()
        self._end(outcome, detail)

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
                )
            )


async def _write_quietly(call: MigrateCall, message: pb.MigrateFeed) -> None:
    try:
        await call.write(message)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
        log.debug("commit write failed (the stream's read will see why): %s", exc)
