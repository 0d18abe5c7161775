"""The synchronous engine: validate requests, run steps, turn sampled tokens into events.

`LLMEngine` is single-threaded by contract: `add`, `abort` and `step` must be called from one
thread (`AsyncEngine` owns that thread). `validate` is pure and may be called from anywhere.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from node_agent.engine.batch import Segment, build_batch
from node_agent.engine.detokenizer import IncrementalDetokenizer
from node_agent.engine.grammar import GrammarCompiler, Matcher, apply_masks
from node_agent.engine.kv_cache import KVPool, SlotAllocator, kv_bytes_per_token, pool_slots
from node_agent.engine.logits import process
from node_agent.engine.logprobs import token_logprobs
from node_agent.engine.sampling import sample
from node_agent.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from node_agent.engine.sequence import (
    FinishReason,
    Request,
    Sequence,
    TokenEvent,
    TokenLogprobs,
)
from node_agent.engine.weights import LoadedModel
from node_agent.facts.errors import RequestError
from node_agent.facts.sizing import model_len
from node_agent.facts.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineConfig:
    """Capacity of one engine instance.

    The KV pool holds `min(max_batch_size, kv_cache_bytes // per-sequence bytes)` sequences of
    `max_model_len` tokens each, allocated once at start: memory is bounded by construction.
    """

    max_batch_size: int = 32  # concurrent sequences (fewer if the KV budget is smaller)
    max_step_tokens: int = 512  # tokens per forward step; long prompts prefill in chunks
    kv_cache_bytes: int = 1 << 30
    max_model_len: int | None = None  # default: the model's context, at most 4096


class LLMEngine:
    def __init__(self, loaded: LoadedModel, tokenizer: Tokenizer, config: EngineConfig):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = tokenizer
        self.config = config
        cfg = loaded.config
        self.max_model_len = model_len(cfg, config.max_model_len)
        per_token = kv_bytes_per_token(cfg, loaded.dtype)
        slots = pool_slots(
            config.kv_cache_bytes, self.max_model_len, per_token, config.max_batch_size
        )
        self.kv = KVPool(cfg, slots, self.max_model_len, loaded.dtype, loaded.device)
        self.scheduler = Scheduler(
            SchedulerConfig(slots, config.max_step_tokens), SlotAllocator(slots), self._share_prompt
        )
        self.grammars = GrammarCompiler(tokenizer)
        self.finished: Counter[FinishReason] = Counter()  # requests ended, by reason
        self.prompt_tokens_copied = 0  # prompt K/V copied from a sibling, not computed

    def validate(self, request: Request) -> Sequence:
        """Check a request against this engine's limits; return its fresh sequence state."""
        prompt_len = len(request.prompt_ids)
        if prompt_len == 0:
            raise RequestError("the prompt is empty: give at least one token")
        self._check_vocabulary((*request.prompt_ids, *request.output_ids))
        self._check_vocabulary((t for t, _ in request.params.logit_bias), "logit_bias: ")
        if prompt_len >= self.max_model_len:
            raise RequestError(
                f"the prompt is {prompt_len} tokens but the model's context is "
                f"{self.max_model_len}: shorten the prompt"
            )
        wanted = prompt_len + request.params.max_tokens
        if wanted > self.max_model_len:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({request.params.max_tokens}) "
                f"exceeds the model's context of {self.max_model_len} tokens: set max_tokens "
                f"to at most {self.max_model_len - prompt_len}"
            )
        if len(request.output_ids) >= request.params.max_tokens:
            raise RequestError(
                f"the request already has {len(request.output_ids)} output tokens, "
                f"max_tokens={request.params.max_tokens}: nothing left to generate"
            )
        grammar = self.grammars.compile(request.params.response_format)
        return Sequence(
            request=request,
            detokenizer=self._detokenizer(request, request.output_ids),
            # where a resumed request stands in its grammar: a function of its output ids
            matcher=Matcher(grammar, request.output_ids) if grammar is not None else None,
        )

    def _check_vocabulary(self, token_ids: Iterable[int], what: str = "") -> None:
        vocab = self.loaded.config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"{what}token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def _detokenizer(self, request: Request, output_ids: Iterable[int]) -> IncrementalDetokenizer:
        """Text deltas for `request`, continuing after `output_ids` (emitted elsewhere)."""
        return IncrementalDetokenizer(
            self.tokenizer, stop=request.params.stop, prefix_ids=tuple(output_ids)
        )

    def add(self, seq: Sequence) -> None:
        if self.scheduler.find(seq.request_id) is not None:
            raise RequestError(f"request id {seq.request_id!r} is already running")
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> TokenEvent | None:
        """Stop a request and free its capacity; None if it is not here (already finished)."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        return self._finish(seq, None, "", FinishReason.ABORT)

    def stop_after(self, request_id: str, outputs: int) -> None:
        """Finish a request with `HANDED_OVER` once it has emitted `outputs` output tokens (at
        its next one if it already has): a live migration's source stops at a token boundary
        the controller chose, and runs no step past it. Unknown or held requests are ignored
        (the request already ended; the controller sees how)."""
        seq = self.scheduler.find(request_id)
        if seq is not None and not seq.held:
            seq.stop_after = max(outputs, seq.num_outputs + 1)

    def extend(self, request_id: str, token_ids: list[int], release: bool) -> None:
        """Give a held sequence the tokens its source emitted since (a migration's catch-up
        round); with `release`, it then generates from the next position as if it had run
        here all along. Raises RequestError if it is not held here or the ids are invalid."""
        seq = self.scheduler.find(request_id)
        if seq is None or not seq.held:
            raise RequestError(f"request {request_id!r} is not being migrated in here")
        self._check_vocabulary(token_ids)
        if seq.num_outputs + len(token_ids) >= seq.params.max_tokens:
            raise RequestError(
                f"{seq.num_outputs + len(token_ids)} output tokens leave nothing to generate "
                f"under max_tokens={seq.params.max_tokens}"
            )
        if seq.matcher is not None:
            for token_id in token_ids:
                seq.matcher.advance(token_id)
        seq.token_ids.extend(token_ids)
        if release:
            if seq.num_pending == 0:
                # Nothing new (the source failed right after the last round): run the last
                # token again for its logits; it rewrites its own KV entry with the same values.
                seq.num_computed -= 1
            outputs = seq.token_ids[len(seq.request.prompt_ids) :]
            seq.detokenizer = self._detokenizer(seq.request, outputs)
            seq.held = False

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _share_prompt(self, seq: Sequence) -> None:
        """A newly admitted sequence whose sibling has computed the same prompt starts from a
        copy of that prompt's K/V (all but the last token, which it runs for its own logits)
        instead of computing it again. Not when it reports the prompt's log probabilities:
        those come from computing it."""
        source = self.scheduler.sibling(seq)
        shared = len(seq.request.prompt_ids) - 1
        if (
            source is None
            or source.slot is None
            or seq.slot is None
            or seq.prompt_logprobs is not None
            or shared < 1
            or source.num_computed < shared
        ):
            return
        self.kv.copy(source.slot, seq.slot, shared)
        seq.num_computed = shared
        self.prompt_tokens_copied += shared

    def step(self) -> list[TokenEvent]:
        """Run one batched forward over the scheduled chunks; one event per sampled token,
        and a `prefilled` event for each held sequence that has caught up."""
        plan = self.scheduler.schedule()
        events: list[TokenEvent] = []
        if plan:
            scored = [c for c in plan if self._scores_prompt(c)]
            with torch.inference_mode():
                logits = self._forward(plan, scored)
            sampling = [c.seq for c in plan if c.samples]
            if scored:  # the rows after the sampled ones
                self._score_prompts(logits[len(sampling) :], scored)
            for chunk in plan:
                chunk.seq.num_computed += chunk.length
            if sampling:  # a step may only prefill (held sequences, long prompts)
                events = self._sample(logits[: len(sampling)], sampling)
        return events + self._report_caught_up()

    @staticmethod
    def _scores_prompt(chunk: ScheduledChunk) -> bool:
        """Whether the chunk's logits give prompt tokens' log probabilities (asked for, and it
        covers a position whose next token is in the prompt)."""
        seq = chunk.seq
        return (
            seq.prompt_logprobs is not None and seq.num_computed < len(seq.request.prompt_ids) - 1
        )

    def _score_prompts(self, logits: torch.Tensor, scored: list[ScheduledChunk]) -> None:
        """Collect prompt tokens' log probabilities from `logits`: for each chunk in `scored`,
        one row per position whose next token is in the prompt, in order (`_forward`)."""
        row = 0
        for chunk in scored:
            seq = chunk.seq
            assert seq.prompt_logprobs is not None
            prompt = seq.request.prompt_ids
            start = seq.num_computed
            count = min(start + chunk.length, len(prompt) - 1) - start
            targets = list(prompt[start + 1 : start + 1 + count])
            rows = logits[row : row + count].float().cpu()
            top = seq.params.prompt_logprobs or 0
            seq.prompt_logprobs.extend(
                lp for lp in token_logprobs(rows, targets, [top] * count) if lp is not None
            )
            row += count

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[TokenEvent]:
        """One token for each of `seqs` from its row of `logits` ([B, vocab]): the logits
        processed (bias, penalties, min_tokens), sampled, and the raw logits' log
        probabilities reported to those that asked."""
        logits = logits.float().cpu()
        params = [seq.params for seq in seqs]
        processed = process(
            logits,
            params,
            [seq.token_ids for seq in seqs],
            [len(seq.request.prompt_ids) for seq in seqs],
            self.tokenizer.eos_token_ids,
        )
        matchers = [seq.matcher for seq in seqs]
        stuck: set[int] = set()
        if any(m is not None for m in matchers):  # the grammar's mask comes last
            processed = processed.clone() if processed is logits else processed
            apply_masks(processed, matchers)
            # a constrained row with nothing allowed (its document complete and EOS banned)
            # samples nothing: it stops instead
            masked = processed.isneginf().all(dim=1).tolist()
            stuck = {i for i, m in enumerate(matchers) if m is not None and masked[i]}
        new_ids = sample(processed, params, [len(seq.token_ids) for seq in seqs])
        logprobs = token_logprobs(logits, new_ids, [p.logprobs for p in params])
        events = []
        for i, (seq, token_id, lp) in enumerate(zip(seqs, new_ids, logprobs, strict=True)):
            if i in stuck:
                events.append(self._finish(seq, None, seq.detokenizer.flush(), FinishReason.STOP))
                continue
            event = self._append(seq, token_id, lp)
            if seq.prompt_logprobs is not None:  # its first token: hand them over, once
                event = dataclasses.replace(event, prompt_logprobs=tuple(seq.prompt_logprobs))
                seq.prompt_logprobs = None
            events.append(event)
        return events

    def _report_caught_up(self) -> list[TokenEvent]:
        events = []
        for seq in self.scheduler.running:
            if seq.caught_up:
                seq.reported = len(seq.token_ids)
                events.append(TokenEvent(seq.request_id, None, "", prefilled=seq.reported))
        return events

    def _forward(self, plan: list[ScheduledChunk], scored: list[ScheduledChunk]) -> torch.Tensor:
        """Logits of each sampling chunk's last token, in plan order; then, for each chunk in
        `scored`, of each of its positions whose next token is in the prompt."""
        tokens: list[int] = []
        segments: list[Segment] = []
        logits_rows: list[int] = []
        prompt_rows: list[int] = []
        scoring = {id(c) for c in scored}
        for chunk in plan:
            seq, start = chunk.seq, chunk.seq.num_computed
            assert seq.slot is not None, "scheduled sequence has no KV slot"
            offset = len(tokens)
            segments.append(Segment(seq.slot, offset, start, chunk.length))
            tokens.extend(seq.token_ids[start : start + chunk.length])
            if chunk.samples:
                logits_rows.append(len(tokens) - 1)
            if id(chunk) in scoring:
                end = min(start + chunk.length, len(seq.request.prompt_ids) - 1)
                prompt_rows.extend(range(offset, offset + end - start))
        logits_rows += prompt_rows
        device = self.loaded.device
        batch = build_batch(
            segments, tokens, self.kv.capacity, self.loaded.config.sliding_window, device
        )
        rows = torch.tensor(logits_rows, dtype=torch.long, device=device)
        return self.model(batch, self.kv, rows)

    def _append(
        self, seq: Sequence, token_id: int, logprobs: TokenLogprobs | None = None
    ) -> TokenEvent:
        seq.token_ids.append(token_id)
        text = seq.detokenizer.push(token_id)
        reason: FinishReason | None = None
        if seq.matcher is not None:
            seq.matcher.advance(token_id)
        if not seq.params.ignore_eos and token_id in self.tokenizer.eos_token_ids:
            reason, text = FinishReason.STOP, text + seq.detokenizer.flush()
        elif seq.matcher is not None and seq.matcher.is_finished():
            # the document is complete: only EOS could follow, so stop here (ignore_eos and
            # min_tokens cannot keep a finished document going)
            reason, text = FinishReason.STOP, text + seq.detokenizer.flush()
        elif seq.detokenizer.stopped:
            reason = FinishReason.STOP
        elif seq.num_outputs >= seq.params.max_tokens:
            reason, text = FinishReason.LENGTH, text + seq.detokenizer.flush()
        elif seq.stop_after is not None and seq.num_outputs >= seq.stop_after:
            reason = FinishReason.HANDED_OVER
        if reason is not None:
            return self._finish(seq, token_id, text, reason, logprobs)
        return TokenEvent(seq.request_id, token_id, text, logprobs=logprobs)

    def _finish(
        self,
        seq: Sequence,
        token_id: int | None,
        text: str,
        reason: FinishReason,
        logprobs: TokenLogprobs | None = None,
    ) -> TokenEvent:
        seq.finish_reason = reason
        self._release(seq)
        return TokenEvent(seq.request_id, token_id, text, reason, logprobs=logprobs)

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.kv.clear(seq.slot, len(seq.token_ids))  # every position it may have written
        self.scheduler.finish(seq)
        self.finished[seq.finish_reason or FinishReason.ERROR] += 1

    def fail_all(self, error: str) -> list[TokenEvent]:
        """End every request with an error (the step itself failed)."""
        events = []
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            seq.finish_reason = FinishReason.ERROR
            self._release(seq)
            events.append(TokenEvent(seq.request_id, None, "", FinishReason.ERROR, error))
        return events
