"""Logit processing before sampling: logit_bias, penalties and min_tokens.

Everything here is a function of the request's parameters, its prompt ids and the ids it has
emitted, nothing else: a request resumed or migrated elsewhere from its prompt + output ids
processes the same logits the same way, so it continues as the uninterrupted run would have.

Order (as vLLM's sampler): `logit_bias` is added; then `repetition_penalty` (vLLM's: a logit of a
token seen in the prompt or output is divided by it if positive, multiplied if negative);
`frequency_penalty` × (times the token is in the output) and `presence_penalty` × (whether it
is) are subtracted (OpenAI's definitions, output tokens only); end-of-sequence tokens get -inf
while fewer than `min_tokens` have been emitted. Temperature, top-k and top-p come after.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from node_agent.engine.sampling import SamplingParams


def process(
    logits: torch.Tensor,
    params: list[SamplingParams],
    token_ids: list[list[int]],
    prompt_lens: list[int],
    eos_ids: Collection[int],
) -> torch.Tensor:
    """The logits ([B, vocab], float32, CPU) with each row's options applied; row i belongs to
    a request with `params[i]` whose known tokens are `token_ids[i]`, the first
    `prompt_lens[i]` of them its prompt. Rows without options are returned unchanged; the
    input is not modified."""
    rows = [i for i, p in enumerate(params) if p.penalizes]
    if not rows:
        return logits
    out = logits.clone()
    vocab = out.shape[1]
    for i in rows:
        _bias(out[i], params[i].logit_bias)
    _penalize(out, rows, params, token_ids, prompt_lens)
    eos = torch.tensor(sorted(t for t in eos_ids if 0 <= t < vocab), dtype=torch.long)
    for i in rows:
        if len(token_ids[i]) - prompt_lens[i] < params[i].min_tokens and eos.numel():
            out[i, eos] = float("-inf")
    return out


def _bias(row: torch.Tensor, logit_bias: tuple[tuple[int, float], ...]) -> None:
    # row: [vocab]; ids past the model's vocabulary were refused by `LLMEngine.validate`
    if logit_bias:
        ids = torch.tensor([t for t, _ in logit_bias], dtype=torch.long)
        row.index_add_(0, ids, torch.tensor([b for _, b in logit_bias], dtype=row.dtype))


def _penalize(
    out: torch.Tensor,
    rows: list[int],
    params: list[SamplingParams],
    token_ids: list[list[int]],
    prompt_lens: list[int],
) -> None:
    """Repetition, frequency and presence penalties for `rows` of `out`, in place, batched."""
    wanted = [
        i
        for i in rows
        if params[i].presence_penalty
        or params[i].frequency_penalty
        or params[i].repetition_penalty != 1.0
    ]
    if not wanted:
        return
    vocab = out.shape[1]
    index = torch.tensor(wanted, dtype=torch.long)
    outputs = _counts([token_ids[i][prompt_lens[i] :] for i in wanted], vocab)  # [R, vocab]
    logits = out[index]
    repetition = torch.tensor([params[i].repetition_penalty for i in wanted]).unsqueeze(1)
    if (repetition != 1.0).any():
        prompts = _counts([token_ids[i][: prompt_lens[i]] for i in wanted], vocab)
        seen = (prompts + outputs) > 0
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
    frequency = torch.tensor([params[i].frequency_penalty for i in wanted]).unsqueeze(1)
    presence = torch.tensor([params[i].presence_penalty for i in wanted]).unsqueeze(1)
    logits = logits - frequency * outputs - presence * (outputs > 0).float()
    out[index] = logits


def _counts(id_lists: list[list[int]], vocab: int) -> torch.Tensor:
    """[len(id_lists), vocab] float32: how often each id occurs in each list."""
    width = max((len(ids) for ids in id_lists), default=0)
    # pad with an extra column `vocab`, dropped at the end
    padded = torch.full((len(id_lists), width), vocab, dtype=torch.long)
    for row, ids in enumerate(id_lists):
        if ids:
            padded[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    counts = torch.zeros(len(id_lists), vocab + 1)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab]
