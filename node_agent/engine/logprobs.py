"""Log probabilities of sampled tokens and their top alternatives (OpenAI's `logprobs`).

They are the model's own distribution: log-softmax of the raw logits, before logit_bias,
penalties, temperature, top-k and top-p (vLLM's default, `raw_logprobs`), so they mean the same
whatever the request's sampling options, and equal `transformers`' log-softmax on the same
weights.
"""

from __future__ import annotations

import torch

from node_agent.engine.sequence import TokenLogprobs


def token_logprobs(
    logits: torch.Tensor, token_ids: list[int], wanted: list[int | None]
) -> list[TokenLogprobs | None]:
    """Row i of `logits` ([B, vocab], float32, CPU) produced `token_ids[i]`: its log probability
    and the `wanted[i]` most likely tokens' (None: the row wants none)."""
    rows = [i for i, k in enumerate(wanted) if k is not None]
    result: list[TokenLogprobs | None] = [None] * len(wanted)
    if not rows:
        return result
    index = torch.tensor(rows, dtype=torch.long)
    logprobs = torch.log_softmax(logits[index], dim=-1)  # [R, vocab]
    chosen = logprobs.gather(1, torch.tensor([[token_ids[i]] for i in rows])).squeeze(1)
    most = max(wanted[i] or 0 for i in rows)
    top_values, top_ids = torch.topk(logprobs, most, dim=-1) if most else (None, None)
    for r, i in enumerate(rows):
        k = wanted[i] or 0
        top: tuple[tuple[int, float], ...] = ()
        if k and top_values is not None and top_ids is not None:
            top = tuple(zip(top_ids[r, :k].tolist(), top_values[r, :k].tolist(), strict=True))
        result[i] = TokenLogprobs(float(chosen[r]), top)
    return result
