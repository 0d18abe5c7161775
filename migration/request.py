"""Token-level state of one in-flight request: what it asked for and every token it has been
given so far. That is enough to resume (or move) the request on any instance of its function:
sampling is deterministic per (seed, position), so the node that continues it after
`output_ids` draws the same tokens the first one would have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from node_agent.proto import node_agent_pb2 as pb


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How a request samples, defaults already applied (by the HTTP layer, from the function's
    `generation` settings): what every node it runs on is asked."""

    max_tokens: int
    """Output tokens in all, resumed ones included; >= 1."""
    temperature: float
    """0 is greedy."""
    top_p: float
    """In (0, 1]."""
    seed: int
    """In [0, 2**63): with the token's position, it fixes each draw."""
    stop: tuple[str, ...] = ()
    """Texts that end the output (not included in it)."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 is off."""
    presence_penalty: float = 0.0
    """-2..2: subtracted from the logit of each token already in the output."""
    frequency_penalty: float = 0.0
    """-2..2: subtracted per occurrence of the token in the output."""
    repetition_penalty: float = 1.0
    """> 0 (vLLM's): logits of tokens in the prompt or output divided (or multiplied, when
    negative) by it; 1 is off."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias in -100..100) pairs, by token id."""
    min_tokens: int = 0
    """No end-of-sequence token before this many output tokens."""
    ignore_eos: bool = False
    """Generate past end-of-sequence tokens, up to `max_tokens`."""
    logprobs: int | None = None
    """None: no log probabilities; else each token's and this many alternatives (0..20)."""
    prompt_logprobs: int | None = None
    """None: none; else each prompt token's (after the first) and this many alternatives,
    with the first token (a resume after it asks for none: see `node_agent.engine`)."""
    response_format: str = ""
    """OpenAI's `response_format` as JSON; the output is constrained to it. Empty: text."""

    def to_proto(self) -> pb.SamplingParams:
        """The wire message. Every option derives from the prompt and output ids, so the same
        message resumes the request anywhere."""
        return pb.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            # 0 on the wire is "off" (1.0), so a request without it sends the default message
            repetition_penalty=0.0 if self.repetition_penalty == 1.0 else self.repetition_penalty,
            logit_bias=dict(self.logit_bias),
            min_tokens=self.min_tokens,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            response_format=self.response_format,
        )


@dataclass(slots=True)
class RequestState:
    """One in-flight request: its prompt, sampling, the tokens emitted so far and where it runs
    now. The token stream appends to `output_ids` as tokens arrive and moves `instance_id` /
    `node_id` when the request resumes elsewhere."""

    request_id: str
    function: str
    prompt_ids: list[int]
    params: SamplingParams
    instance_id: str = ""
    node_id: str = ""
    output_ids: list[int] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    prefix_from: str = ""
    """A sibling choice (`n` > 1) with the same prompt, whose prompt K/V the instance may copy
    when both run there."""

    def generate_request(self, instance_id: str) -> pb.GenerateRequest:
        """The `Generate` call that runs (or resumes, after `output_ids`) this request on
        `instance_id`."""
        return pb.GenerateRequest(
            instance_id=instance_id,
            request_id=self.request_id,
            prompt_ids=self.prompt_ids,
            output_ids=self.output_ids,
            params=self.params.to_proto(),
            prefix_from=self.prefix_from,
        )
