"""The simulator's trace readers: real excerpts parse; bad rows, empty files and unsorted
timestamps are refused with the file, the line and the fix."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from stoke.simulate.traces import TraceError, read_requests, read_spot

DATA = Path(__file__).parent / "data" / "traces"
CONV = DATA / "AzureLLMInferenceTrace_conv_head300.csv"
SPOT = DATA / "preemption_4-node_aws-08-03-2023_us-east-1f_v100_1.json"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_azure_excerpt_parses_in_arrival_order() -> None:
    rows = CONV.read_text().splitlines()[1:]
    reqs = read_requests(CONV)
    assert len(reqs) == len(rows)
    assert reqs[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(reqs))
    context, generated = rows[1].split(",")[1:]
    assert (reqs[1].context_tokens, reqs[1].generated_tokens) == (int(context), int(generated))
    # 2023-11-16 18:15:46.6805900 -> 18:15:50.9951690: 100 ns digits are read to the us.
    assert reqs[1].arrival_s == pytest.approx(4.314579, abs=1e-6)


def test_bad_row_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47,x,5\n")
    with pytest.raises(TraceError, match=r"t\.csv line 3: ContextTokens 'x' is not a whole"):
        read_requests(path)


def test_short_row_and_bad_timestamp(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="line 2: 2 fields, expected 3"):
        read_requests(write(tmp_path, HEADER + "2023-11-16 18:15:46,374\n"))
    with pytest.raises(TraceError, match="line 2: 'yesterday' is not a timestamp"):
        read_requests(write(tmp_path, HEADER + "yesterday,1,2\n"))


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="line 1: expected the header"):
        read_requests(write(tmp_path, ""))
    with pytest.raises(TraceError, match="no requests after the header"):
        read_requests(write(tmp_path, HEADER))


def test_unsorted_timestamps_are_refused_not_sorted(tmp_path: Path) -> None:
    text = HEADER + "2023-11-16 18:15:47,1,1\n2023-11-16 18:15:46,1,1\n"
    with pytest.raises(TraceError, match=r"line 3: timestamp .* earlier .*sort it by TIMESTAMP"):
        read_requests(write(tmp_path, text))


def test_spot_excerpt_parses() -> None:
    trace = read_spot(SPOT)
    assert trace.gap_s == 300.0
    assert trace.peak == 4
    assert trace.at(0.0) == trace.counts[0]
    assert trace.at(300.0 * len(trace.counts)) == trace.counts[0]  # wraps around


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not JSON"),
        ('{"metadata": {"gap_seconds": 0}, "data": [1]}', "gap_seconds 0 is not a positive"),
        ('{"metadata": {"gap_seconds": 30}, "data": []}', "non-empty list"),
        ('{"metadata": {"gap_seconds": 30}, "data": [1, -1]}', r"data\[1\] -1 is not"),
        ('{"metadata": {"gap_seconds": 30}, "data": [0, 0]}', "every count is 0"),
    ],
)
def test_bad_spot_traces(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        read_spot(write(tmp_path, text, "s.json"))
