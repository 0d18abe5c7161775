"""node_agent.engine.detokenizer: streaming text that matches decode(), and stop strings."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from node_agent.engine.detokenizer import IncrementalDetokenizer
from node_agent.facts.tokenizer import Tokenizer

MULTILINGUAL = "Voilà: 東京の夜 🙂🚀 ünïcödé, Ελληνικά, العربية, 👩‍👩‍👧 done."


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


def stream(
    tok: Tokenizer, ids: Sequence[int], stop: Sequence[str] = (), prefix: Sequence[int] = ()
) -> tuple[list[str], IncrementalDetokenizer]:
    """Push `ids` one by one (after priming with `prefix`); the deltas, flush last."""
    detok = IncrementalDetokenizer(tok, stop=stop, prefix_ids=prefix)
    deltas = [detok.push(i) for i in ids]
    return [*deltas, detok.flush()], detok


class CountingTokenizer:
    """Decodes like `tok` and counts how many ids it was asked to decode."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.decoded = tok, 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return self.tok.decode(ids, skip_special_tokens)


def test_deltas_concatenate_to_decode_of_multilingual_text(tok: Tokenizer) -> None:
    ids = tok.encode(MULTILINGUAL)
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == MULTILINGUAL


def test_no_delta_contains_a_split_character(tok: Tokenizer) -> None:
    ids = tok.encode(MULTILINGUAL)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "text must split characters"
    deltas, _ = stream(tok, ids)
    assert not any("\ufffd" in delta for delta in deltas)


def test_deltas_concatenate_to_decode_of_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        deltas, _ = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids), ids


def test_incomplete_character_is_held_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("🚀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🚀"]


def test_flush_emits_trailing_incomplete_character_like_decode(tok: Tokenizer) -> None:
    ids = tok.encode("a🚀")[:-1]
    deltas, _ = stream(tok, ids)
    assert deltas[-1].endswith("\ufffd")
    assert "".join(deltas) == tok.decode(ids)


def test_special_tokens_are_skipped(tok: Tokenizer) -> None:
    deltas, detok = stream(tok, tok.encode("<|im_start|>hi<|im_end|>"))
    assert detok.text == "".join(deltas) == "hi"


def test_stop_string_truncates_output(tok: Tokenizer) -> None:
    _, detok = stream(tok, tok.encode("The keeper wrote a line. Then he slept."), stop=["Then"])
    assert detok.text == "The keeper wrote a line. "
    assert detok.stopped and detok.matched_stop == "Then"


def test_stop_string_spanning_several_tokens(tok: Tokenizer) -> None:
    stop = "upon a lighthouse"
    assert len(tok.encode(stop)) > 2
    _, detok = stream(tok, tok.encode("Once upon a lighthouse, once upon a time"), stop=[stop])
    assert detok.text == "Once "


def test_stop_string_inside_one_token_is_cut(tok: Tokenizer) -> None:
    ids = tok.encode("the garden")
    assert "arde" in tok.decode(ids[-1:])
    _, detok = stream(tok, ids, stop=["arde"])
    assert detok.text == "the g"


def test_possible_stop_prefix_is_held_back(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, stop=["Goodbye"])
    emitted = "".join(detok.push(i) for i in tok.encode("Hello. Good"))
    assert emitted == "Hello. "


def test_held_text_is_released_once_it_is_not_a_stop(tok: Tokenizer) -> None:
    deltas, _ = stream(tok, tok.encode("Hello. Good morning"), stop=["Goodbye"])
    assert "".join(deltas[:-1]) == "Hello. Good morning"[: len("".join(deltas[:-1]))]
    assert "".join(deltas) == "Hello. Good morning"


def test_flush_emits_held_back_text(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, stop=["Goodbye"])
    for i in tok.encode("Hello. Good"):
        detok.push(i)
    assert detok.flush() == "Good"
    assert detok.text == "Hello. Good" and not detok.stopped


def test_earliest_stop_string_wins(tok: Tokenizer) -> None:
    _, detok = stream(tok, tok.encode("one three"), stop=["ee", "thr"])
    assert detok.text == "one " and detok.matched_stop == "thr"


def test_push_after_stop_emits_nothing(tok: Tokenizer) -> None:
    _, detok = stream(tok, tok.encode("stop here"), stop=["here"])
    assert detok.push(tok.encode(" more")[0]) == "" and detok.flush() == ""


def test_empty_stop_strings_are_ignored(tok: Tokenizer) -> None:
    _, detok = stream(tok, tok.encode("plain text"), stop=[""])
    assert detok.text == "plain text" and not detok.stopped


@pytest.mark.parametrize("split", [1, 3, 7, 12])
def test_prefix_ids_resume_the_stream_exactly(tok: Tokenizer, split: int) -> None:
    ids = tok.encode(MULTILINGUAL)
    whole, whole_detok = stream(tok, ids, stop=["Ελλ"])
    resumed, detok = stream(tok, ids[split:], stop=["Ελλ"], prefix=ids[:split])
    emitted_before = IncrementalDetokenizer(tok, stop=["Ελλ"], prefix_ids=ids[:split]).text
    assert emitted_before + "".join(resumed) == "".join(whole)
    assert detok.text == whole_detok.text


def test_prefix_text_counts_as_emitted(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, prefix_ids=tok.encode("Hello"))
    assert detok.text == "Hello"
    assert "".join(detok.push(i) for i in tok.encode(" world")) == " world"


def test_decoding_work_per_token_is_bounded(tok: Tokenizer) -> None:
    counting = CountingTokenizer(tok)
    ids = tok.encode(MULTILINGUAL * 8)
    detok = IncrementalDetokenizer(counting)
    for i in ids:
        detok.push(i)
    assert counting.decoded < 12 * len(ids)
