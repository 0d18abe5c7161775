"""`StreamedLoad`: an engine built over partition files whose bytes have not landed yet. Its
forward passes wait for their weights; once everything has landed they give exactly what an
engine loaded the usual way gives; a failed copy fails the waiting pass."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from checkpoint_format import MANIFEST_NAME, Manifest
from node_agent.engine import load_engine
from node_agent.engine.sampling import SamplingParams
from node_agent.engine.sequence import Request, TokenEvent
from node_agent.engine.streamed import StreamedLoad
from node_agent.facts.errors import WeightsError
from node_agent.instances.streaming import need_order


def _staging(ckpt: Path, root: Path) -> tuple[Path, Manifest]:
    """What a promotion's staging directory holds when its tap hears `begin`: the small files,
    the partition files at full size (zeros), no manifest."""
    manifest = Manifest.from_json((ckpt / MANIFEST_NAME).read_bytes(), source="test")
    staging = root / "staging"
    staging.mkdir()
    for name in manifest.files:
        shutil.copyfile(ckpt / name, staging / name)
    for part in manifest.partitions:
        with open(staging / part.file, "wb") as f:
            f.truncate(part.nbytes)
    return staging, manifest


def _write(
    ckpt: Path, staging: Path, manifest: Manifest, spans: list[tuple[int, int, int]]
) -> None:
    for part, start, end in spans:
        name = manifest.partitions[part].file
        with open(ckpt / name, "rb") as src:
            src.seek(start)
            data = src.read(end - start)
        fd = os.open(staging / name, os.O_WRONLY)
        try:
            os.pwrite(fd, data, start)
        finally:
            os.close(fd)


def _whole(manifest: Manifest) -> list[tuple[int, int, int]]:
    return [(i, 0, p.nbytes) for i, p in enumerate(manifest.partitions)]


def _generate(engine: object, out: list[TokenEvent], errors: list[BaseException]) -> None:
    try:
        ids = tuple(engine.tokenizer.encode("streamed weights"))  # type: ignore[attr-defined]
        request = Request("r", ids, SamplingParams(max_tokens=6, temperature=0.0))
        engine.add(engine.validate(request))  # type: ignore[attr-defined]
        while engine.has_work():  # type: ignore[attr-defined]
            out.extend(engine.step())  # type: ignore[attr-defined]
    except BaseException as exc:
        errors.append(exc)


def _reference(ckpt: Path) -> list[int | None]:
    engine = load_engine(ckpt)
    out: list[TokenEvent] = []
    _generate(engine, out, [])
    return [e.token_id for e in out]


def test_a_pass_waits_for_its_weights_then_matches_a_normal_load(
    tiny_ckpt_dir: Path, tmp_path: Path
) -> None:
    staging, manifest = _staging(tiny_ckpt_dir, tmp_path)
    load = StreamedLoad((staging, tmp_path / "committed"), manifest)
    order = need_order(manifest)
    head = order[:-1]  # everything but the last tensor the pass needs
    _write(tiny_ckpt_dir, staging, manifest, head)
    load.land(head)
    out: list[TokenEvent] = []
    errors: list[BaseException] = []
    thread = threading.Thread(target=_generate, args=(load.engine, out, errors))
    thread.start()
    thread.join(1.0)
    assert thread.is_alive() and not out, "the pass ran without its last tensor"
    _write(tiny_ckpt_dir, staging, manifest, order[-1:])
    load.land(order[-1:])
    thread.join(60)
    assert not errors and not thread.is_alive()
    whole = _whole(manifest)  # alignment padding between tensors lands too
    _write(tiny_ckpt_dir, staging, manifest, whole)
    load.land(whole)
    load.finish()
    assert [e.token_id for e in out] == _reference(tiny_ckpt_dir)


def test_the_directory_may_be_renamed_before_the_worker_opens_it(
    tiny_ckpt_dir: Path, tmp_path: Path
) -> None:
    staging, manifest = _staging(tiny_ckpt_dir, tmp_path)
    committed = tmp_path / "committed"
    spans = _whole(manifest)
    _write(tiny_ckpt_dir, staging, manifest, spans)
    staging.rename(committed)  # the copy finished and was committed first
    load = StreamedLoad((staging, committed), manifest)
    load.land(spans)
    load.finish()
    out: list[TokenEvent] = []
    _generate(load.engine, out, [])
    assert [e.token_id for e in out] == _reference(tiny_ckpt_dir)


def test_a_failed_copy_fails_the_waiting_pass(tiny_ckpt_dir: Path, tmp_path: Path) -> None:
    staging, manifest = _staging(tiny_ckpt_dir, tmp_path)
    load = StreamedLoad((staging, tmp_path / "committed"), manifest)
    out: list[TokenEvent] = []
    errors: list[BaseException] = []
    thread = threading.Thread(target=_generate, args=(load.engine, out, errors))
    thread.start()
    load.fail("ShortFileError: truncated")
    thread.join(60)
    assert len(errors) == 1 and isinstance(errors[0], WeightsError)
    assert "truncated" in str(errors[0])


def test_finish_before_every_byte_landed_is_refused(tiny_ckpt_dir: Path, tmp_path: Path) -> None:
    staging, manifest = _staging(tiny_ckpt_dir, tmp_path)
    load = StreamedLoad((staging, tmp_path / "committed"), manifest)
    load.land(need_order(manifest)[:1])
    with pytest.raises(WeightsError, match="partitions \\[0\\] are not"):
        load.finish()
