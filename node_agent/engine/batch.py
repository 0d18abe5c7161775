"""One step's flat batch: every scheduled token in one vector, plus how attention reads it.

Decode segments (one new token each) come first and attend together in one batched call over
the slot range they span; longer segments (prefill chunks) attend one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """One sequence's run of tokens in the flat batch.

    Rows [offset, offset + length) of the batch are positions [start, start + length) of the
    sequence in KV slot `slot`; attention reads positions [0, end).
    """

    slot: int
    offset: int
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class DecodeGroup:
    """Rows [0, rows) are single decode tokens, attending together over slots
    [first_slot, first_slot + num_slots) and positions [0, end)."""

    rows: int
    first_slot: int
    num_slots: int
    end: int
    row_slots: torch.Tensor  # [rows]: each row's slot - first_slot
    mask: torch.Tensor | None  # [num_slots, 1, 1, end], True = attend


@dataclass(frozen=True)
class FlatBatch:
    tokens: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    write_index: torch.Tensor  # [N]: slot * capacity + position, where K/V are stored
    decode: DecodeGroup | None
    prefill: list[Segment]  # attended one by one
    max_position: int


def build_batch(
    segments: list[Segment],
    token_ids: list[int],
    capacity: int,
    window: int | None,
    device: torch.device,
) -> FlatBatch:
    """Assemble the tensors for one step.

    The leading run of one-token segments forms the batched decode group (the scheduler puts
    decoding sequences first); every other segment is attended on its own.
    """
    positions = [pos for seg in segments for pos in range(seg.start, seg.end)]
    write = [seg.slot * capacity + pos for seg in segments for pos in range(seg.start, seg.end)]
    leading = next((i for i, seg in enumerate(segments) if seg.length != 1), len(segments))
    decodes, others = segments[:leading], segments[leading:]
    return FlatBatch(
        tokens=torch.tensor(token_ids, device=device),
        positions=torch.tensor(positions, device=device),
        write_index=torch.tensor(write, device=device),
        decode=_decode_group(decodes, window, device) if decodes else None,
        prefill=others,
        max_position=max(positions),
    )


def _decode_group(decodes: list[Segment], window: int | None, device: torch.device) -> DecodeGroup:
    first = min(seg.slot for seg in decodes)
    num_slots = max(seg.slot for seg in decodes) - first + 1
    end = max(seg.end for seg in decodes)
    mask = None
    if num_slots > 1 or (window is not None and end > window):
        # Slots in the range that are not decoding this step attend to position 0 only: their
        # rows are computed and discarded, and must not be all-masked (NaN).
        query = torch.zeros(num_slots, dtype=torch.long)
        for seg in decodes:
            query[seg.slot - first] = seg.start
        keys = torch.arange(end).unsqueeze(0)
        allowed = keys <= query.unsqueeze(1)
        if window is not None:
            allowed &= keys > query.unsqueeze(1) - window
        mask = allowed.view(num_slots, 1, 1, end).to(device)
    row_slots = torch.tensor([seg.slot - first for seg in decodes], device=device)
    return DecodeGroup(len(decodes), first, num_slots, end, row_slots, mask)
