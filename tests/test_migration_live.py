"""Live migration in `migration.stream.TokenStream` + `migration.live.LiveMigration`, against
scripted calls (no controller, no node): the hand-over's token continuity and slot accounting,
and the races a slow client or a failing destination create."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from migration.live import MigrationConfig, MigrationReport, Outcome, Reason
from migration.request import RequestState, SamplingParams
from migration.stream import TokenStream
from node_agent.proto import node_agent_pb2 as pb

TOKENS = list(range(100, 140))  # what the request generates, wherever it runs
CONFIG = MigrationConfig(max_delta_tokens=2, round_timeout_s=5, handover_timeout_s=5)


@dataclass(frozen=True)
class Instance:
    instance_id: str
    node_id: str


def token(t: int, last: bool = False) -> pb.TokenEvent:
    reason = pb.FINISH_REASON_LENGTH if last else pb.FINISH_REASON_UNSPECIFIED
    return pb.TokenEvent(has_token=True, token_id=t, text=f"<{t}>", finish_reason=reason)


class SourceCall:
    """A Generate stream whose tokens the test releases one by one (`emit`); asked to stop
    after some output (`stop_after`), it ends with that token, HANDED_OVER, as a worker does."""

    def __init__(self, start: int = 0) -> None:
        self.next, self.cancelled = start, False
        self.stop_at: int | None = None
        self.stopped = False
        self.queue: asyncio.Queue[pb.TokenEvent] = asyncio.Queue()

    def emit(self, n: int = 1) -> None:
        for _ in range(n):
            if self.stopped:
                return
            event = token(TOKENS[self.next], self.next == len(TOKENS) - 1)
            self.next += 1
            if self.stop_at is not None and self.next >= self.stop_at and not event.finish_reason:
                event.finish_reason, self.stopped = pb.FINISH_REASON_HANDED_OVER, True
            self.queue.put_nowait(event)

    def stop_after(self, outputs: int) -> None:
        self.stop_at = max(outputs, self.next + 1)

    async def _run(self) -> AsyncIterator[pb.TokenEvent]:
        while True:
            event = await self.queue.get()
            yield event
            if event.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                return

    def __aiter__(self) -> AsyncIterator[pb.TokenEvent]:
        return self._run()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class MigrateCall:
    """The destination's side: acknowledges each round (unless `hang`), and after the commit
    generates the rest of TOKENS (unless `fail_after_commit`)."""

    def __init__(
        self, hang: bool = False, fail_after_commit: bool = False, manual: bool = False
    ) -> None:
        self.hang, self.fail_after_commit = hang, fail_after_commit
        self.manual = manual  # answer only when the test calls `answer`
        self.feeds: list[tuple[str, list[int]]] = []
        self.known: list[int] = []
        self.prompt = 0
        self.sent: list[str] = []
        self.cancelled = False
        self.events: asyncio.Queue[Any] = asyncio.Queue()

    async def write(self, msg: pb.MigrateFeed) -> None:
        kind = msg.WhichOneof("kind")
        self.sent.append(kind)
        if kind == "begin":
            self.prompt = len(msg.begin.prompt_ids)
            self.known = list(msg.begin.output_ids)
        else:
            self.known += list(getattr(msg, kind).ids)
        ids = msg.begin.output_ids if kind == "begin" else getattr(msg, kind).ids
        self.feeds.append((kind, list(ids)))
        if kind == "commit":
            if self.fail_after_commit:
                self.events.put_nowait(_rpc_error())
                return
            for i in range(len(self.known), len(TOKENS)):
                last = i == len(TOKENS) - 1
                self.events.put_nowait(pb.MigrateEvent(token=token(TOKENS[i], last)))
            self.events.put_nowait(grpc.aio.EOF)
        elif not self.hang and not self.manual:
            self.answer()

    def answer(self) -> None:
        """Everything sent so far is in the KV cache (one answer, however many feeds)."""
        self.events.put_nowait(pb.MigrateEvent(prefilled=self.prompt + len(self.known)))

    async def done_writing(self) -> None:
        pass

    async def read(self) -> Any:
        item = await self.events.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        self.events.put_nowait(grpc.aio.EOF)
        return True


class _Err(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="the destination died",
        )


def _rpc_error() -> grpc.aio.AioRpcError:
    return _Err()


class Host:
    def __init__(self, source: SourceCall, dest: MigrateCall, refuse_stop: bool = False) -> None:
        self.source, self.dest, self.refuse_stop = source, dest, refuse_stop
        self.restarted: list[list[int]] = []
        self.released: list[str] = []
        self.reports: list[MigrationReport] = []
        self.resumed: list[list[int]] = []

    def start_call(self, instance: Instance, request: RequestState) -> Any:
        if instance.instance_id == "src" and not self.source.stopped:
            return self.source
        call = SourceCall(start=len(request.output_ids))
        if instance.instance_id == "src":  # stopped for a migration that then ended
            self.restarted.append(list(request.output_ids))
            call.emit(len(TOKENS) - call.next)
        else:
            self.resumed.append(list(request.output_ids))  # a resume elsewhere
        return call

    async def stop_after(self, instance: Instance, request: RequestState, outputs: int) -> None:
        assert instance.instance_id == "src"
        if self.refuse_stop:
            raise RuntimeError("the node could not be reached")
        self.source.stop_after(outputs)

    def release(self, instance: Instance) -> None:
        self.released.append(instance.instance_id)

    def drop_instance(self, instance: Instance) -> None:
        pass

    def track(self, request: RequestState) -> None:
        pass

    def untrack(self, request: RequestState) -> None:
        pass

    def spawn(self, coro: Coroutine[Any, Any, None]) -> object:
        return asyncio.ensure_future(coro)

    def start_migrate_call(self, instance: Instance, request: RequestState) -> Any:
        return self.dest

    def migration_done(self, report: MigrationReport) -> None:
        self.reports.append(report)


def make(host: Host) -> TokenStream[Instance]:
    request = RequestState(
        "r1", "f", [1, 2, 3], SamplingParams(max_tokens=len(TOKENS), temperature=0, top_p=1, seed=1)
    )

    async def relocate(exclude: frozenset[str]) -> Instance:
        return Instance("third", "n3")

    return TokenStream(host, request, Instance("src", "n1"), relocate)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.parametrize("refuse_stop", [False, True], ids=["stopped", "cancelled"])
def test_hand_over_continues_the_stream_with_every_token_once_and_each_slot_once(
    refuse_stop: bool,
) -> None:
    """Ready, the stream asks the source to stop after the token it computes now and hands
    over at it; a source whose node cannot be asked is cancelled at its next token instead."""

    async def main() -> tuple[list[int], Host, TokenStream[Instance]]:
        host = Host(SourceCall(), MigrateCall(), refuse_stop=refuse_stop)
        stream = make(host)
        got: list[int] = []
        events = aiter(stream)
        host.source.emit(5)
        for _ in range(5):
            got.append((await anext(events)).token_id)
        migration = stream.migrate(Instance("dst", "n2"), Reason.ADMIN, CONFIG)
        await settle()
        assert migration.ready  # round 0 acknowledged, nothing new since
        host.source.emit(3)  # never read: the hand-over comes at the next pull
        async for event in events:
            got.append(event.token_id)
        await settle()
        return got, host, stream

    got, host, stream = asyncio.run(main())
    assert got == TOKENS
    assert host.dest.sent == ["begin", "commit"]
    assert (host.source.cancelled, host.source.stopped) == (refuse_stop, not refuse_stop)
    # Stopped, the source hands over after the token it computed when asked (the commit
    # carries it); cancelled, at the token the client held (the destination has it already).
    assert host.dest.feeds[-1] == ("commit", [] if refuse_stop else [TOKENS[5]])
    assert host.released == ["src", "dst"]  # the source at the hand-over, then the end
    (report,) = host.reports
    assert report.outcome is Outcome.COMPLETED and report.pause_s is not None
    assert stream.migration is None


def test_a_close_destination_follows_token_by_token_and_the_commit_carries_one_token() -> None:
    """Once at most `follow_delta_tokens` remain, each token the source emits goes on to the
    destination as it arrives, without waiting for an answer; once an answer shows it caught
    up, the hand-over's commit carries only the source's last token (one decode step)."""

    async def main() -> tuple[list[int], MigrateCall]:
        host = Host(SourceCall(), MigrateCall(manual=True))
        stream = make(host)
        events = aiter(stream)
        got: list[int] = []

        async def pull(n: int) -> None:
            host.source.emit(n)
            for _ in range(n):
                got.append((await anext(events)).token_id)
            await settle()

        await pull(5)
        migration = stream.migrate(Instance("dst", "n2"), Reason.ADMIN, MigrationConfig())
        await settle()
        await pull(3)  # during round 0
        host.dest.answer()  # round 0: 3 behind, under follow_delta_tokens: follow
        await settle()
        assert not migration.ready
        await pull(1)
        await pull(1)  # sent on as they come, no answer awaited
        assert [kind for kind, _ in host.dest.feeds] == [
            "begin",
            "catch_up",
            "catch_up",
            "catch_up",
        ]
        waiting = asyncio.ensure_future(anext(events))  # the stream waits on the source
        await settle()
        host.dest.answer()
        await settle()
        assert migration.ready  # 0 behind
        host.source.emit(len(TOKENS) - len(got))
        got.append((await waiting).token_id)  # the source's last: the commit carries it
        async for event in events:
            got.append(event.token_id)
        return got, host.dest

    got, dest = asyncio.run(main())
    assert got == TOKENS
    assert dest.feeds == [
        ("begin", TOKENS[:5]),
        ("catch_up", TOKENS[5:8]),
        ("catch_up", TOKENS[8:9]),
        ("catch_up", TOKENS[9:10]),
        ("commit", TOKENS[10:11]),
    ]


def test_tokens_the_source_emits_once_ready_still_go_on_so_the_commit_carries_one() -> None:
    """Ready with a token not yet sent (it came during the last round), the migration sends
    it on at once: the destination computes it while the source computes its last, and the
    commit carries only that last one."""

    async def main() -> tuple[list[int], MigrateCall]:
        host = Host(SourceCall(), MigrateCall(manual=True))
        stream = make(host)
        events = aiter(stream)
        host.source.emit(5)
        got = [(await anext(events)).token_id for _ in range(5)]
        migration = stream.migrate(Instance("dst", "n2"), Reason.ADMIN, MigrationConfig())
        await settle()
        host.source.emit(1)
        got.append((await anext(events)).token_id)  # during round 0
        waiting = asyncio.ensure_future(anext(events))
        await settle()
        host.dest.answer()  # 1 behind: ready at once (the source is asked to stop)
        await settle()
        assert migration.ready
        assert host.dest.feeds[-1] == ("catch_up", TOKENS[5:6])
        host.source.emit(len(TOKENS))
        got.append((await waiting).token_id)
        got += [event.token_id async for event in events]
        return got, host.dest

    got, dest = asyncio.run(main())
    assert got == TOKENS
    assert dest.feeds == [
        ("begin", TOKENS[:5]),
        ("catch_up", TOKENS[5:6]),
        ("commit", TOKENS[6:7]),
    ]


def test_a_migration_that_aborts_while_a_slow_client_holds_the_stream_leaves_it_on_the_source() -> (
    None
):
    async def main() -> tuple[list[int], Host]:
        host = Host(SourceCall(), MigrateCall())
        stream = make(host)
        events = aiter(stream)
        host.source.emit(3)
        got = [(await anext(events)).token_id]  # the client now holds the stream at a yield
        migration = stream.migrate(Instance("dst", "n2"), Reason.ADMIN, CONFIG)
        await settle()
        assert migration.ready
        migration.abort(Outcome.ABORTED, "the test aborts it")
        await settle()
        host.source.emit(len(TOKENS) - 3)
        async for event in events:
            got.append(event.token_id)
        return got, host

    got, host = asyncio.run(main())
    assert got == TOKENS and not host.source.cancelled
    # Asked to stop when the migration became ready, the source stopped after it aborted:
    # the request goes on on the same instance, from the recorded tokens.
    assert host.source.stopped and host.restarted == [TOKENS[:4]]
    assert host.released == ["dst", "src"]  # the destination on abort, the source at the end
    assert [r.outcome for r in host.reports] == [Outcome.ABORTED]


def test_a_hung_destination_aborts_and_a_destination_dead_at_the_commit_resumes_elsewhere() -> None:
    async def hung() -> tuple[list[int], Host]:
        host = Host(SourceCall(), MigrateCall(hang=True))
        stream = make(host)
        config = MigrationConfig(round_timeout_s=0.05)
        events = aiter(stream)
        host.source.emit(2)
        got = [(await anext(events)).token_id]
        stream.migrate(Instance("dst", "n2"), Reason.ADMIN, config)
        await asyncio.sleep(0.2)
        host.source.emit(len(TOKENS) - 2)
        async for event in events:
            got.append(event.token_id)
        return got, host

    got, host = asyncio.run(hung())
    assert got == TOKENS and host.dest.cancelled
    assert [r.outcome for r in host.reports] == [Outcome.ABORTED]
    assert "round 0" in host.reports[0].detail

    async def dead_with_resume() -> tuple[list[int], Host]:
        host = Host(SourceCall(), MigrateCall(fail_after_commit=True))
        original = host.start_call

        def start_call(instance: Instance, request: RequestState) -> Any:
            call = original(instance, request)
            if instance.instance_id != "src":
                call.emit(len(TOKENS) - call.next)
            return call

        host.start_call = start_call  # type: ignore[method-assign]
        stream = make(host)
        events = aiter(stream)
        host.source.emit(4)
        got = [(await anext(events)).token_id for _ in range(4)]
        stream.migrate(Instance("dst", "n2"), Reason.ADMIN, CONFIG)
        await settle()
        host.source.emit(1)
        async for event in events:
            got.append(event.token_id)
        return got, host

    got, host = asyncio.run(dead_with_resume())
    assert got == TOKENS
    assert host.resumed == [TOKENS[:5]]  # from the recorded tokens (the stop's too), on "third"
    assert [r.outcome for r in host.reports] == [Outcome.COMPLETED]  # reported, no pause
    assert host.reports[0].pause_s is None
    assert sorted(host.released) == ["dst", "src", "third"]


def test_a_request_ending_on_the_source_mid_migration_is_finished_though_the_reader_closes() -> (
    None
):
    """The HTTP layer closes the stream as soon as it has the last event: the migration
    still ends `finished` (not `cancelled`), and both slots are given back."""

    async def main() -> tuple[list[int], Host, MigrateCall]:
        host = Host(SourceCall(), MigrateCall(hang=True))
        stream = make(host)
        events = aiter(stream)
        host.source.emit(3)
        got = [(await anext(events)).token_id for _ in range(3)]
        stream.migrate(Instance("dst", "n2"), Reason.ADMIN, CONFIG)
        await settle()
        host.source.emit(len(TOKENS) - 3)
        while True:
            event = await anext(events)
            got.append(event.token_id)
            if event.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                break
        await stream.aclose()  # at the last event, as a reader that is done does
        return got, host, host.dest

    got, host, dest = asyncio.run(main())
    assert got == TOKENS
    assert [r.outcome for r in host.reports] == [Outcome.FINISHED]
    assert dest.cancelled and sorted(host.released) == ["dst", "src"]
