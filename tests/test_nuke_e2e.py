"""End to end in Nuke's shoes: Read -> Vera Edit -> Generate against a real engine process on loopback running
a real checkpoint, then Bake layers and Cancel. The fake ``nuke`` renders and reads EXRs through OpenImageIO.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import OpenImageIO as oiio
import pytest

from vera_engine.pipelines.model_store import resolve_model_dir
from vera_engine.service.testing import EngineProcess
from vera_plugin.client import EngineClient
from vera_proto.vera.v1 import engine_pb2 as pb

from .test_nuke import (
    LAYERED,
    fake_nuke_session,
    plate_read,
    read_exr,
    render_node,
    wait_done,
    write_plate,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def e2e_model(root: Path) -> Path:
    """The checkpoint these tests run: the shipped default model."""
    return resolve_model_dir("default")


@pytest.fixture
def nk(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    yield from fake_nuke_session(monkeypatch)


@pytest.fixture
def host(nk: ModuleType) -> ModuleType:
    return importlib.import_module("vera_plugin.hosts.nuke.adapter")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    root = tmp_path_factory.mktemp("nuke_e2e")
    with EngineProcess(root / "spool", e2e_model(tmp_path_factory.getbasetemp())) as process:
        with EngineClient(process.address) as client:
            client.wait_until_serving(120)
        yield process


def test_generate_then_bake_with_a_real_engine(
    nk: ModuleType, host: ModuleType, engine: EngineProcess, tmp_path: Path
) -> None:
    (tmp_path / "shot").mkdir()
    nk.scriptSaveAs(str(tmp_path / "shot" / "sh020_comp.nk"))
    nk.root()["workingSpaceLUT"].setValue("ACEScg")
    read = plate_read(nk, write_plate(tmp_path / "plate"))
    read.setSelected(True)
    node = host.create_node(engine.address)
    node["prompt"].setValue("add a red ball")
    node["steps"].setValue(2)
    node["seed"].setValue(1234)
    host.generate(node)
    status = wait_done(nk, host, node, timeout=240)
    job = node["job_id"].value()
    assert status == f"done: job {job}, frames 1001-1003, seed 1234", status
    folder = tmp_path / "shot" / "vera_cache" / "sh020_comp" / job
    result = node.node("VeraResult")
    assert result["file"].evaluate() == (folder / "vera_edit.####.exr").as_posix()
    assert (result["first"].value(), result["last"].value()) == (1001, 1003)
    assert sorted(p.name for p in folder.iterdir()) == [f"vera_edit.{f}.exr" for f in (1001, 1002, 1003)]
    for frame in (1001, 1002, 1003):
        pixels, names = read_exr(folder / f"vera_edit.{frame}.exr")
        assert names == LAYERED and pixels.shape == (20, 24, 9) and np.isfinite(pixels).all()
        inp = oiio.ImageInput.open(str(folder / f"vera_edit.{frame}.exr"))
        header = inp.spec()
        inp.close()
        assert header.getattribute("vera/job_id") == job
        assert header.getattribute("vera/prompt") == "add a red ball"
        assert header.getattribute("vera/task") == "object_addition"
    # The node's output is the engine's composite with the edit and matte layers.
    out = render_node(nk, node, tmp_path / "check", 1002)
    composite, _ = read_exr(folder / "vera_edit.1002.exr")
    assert set(LAYERED) <= set(out)
    np.testing.assert_array_equal(out["edit.A"], composite[..., 7])
    # Baked: edit layer over the source reproduces the engine's composite (comp = plate·(1−a) + edit).
    baked = host.bake_layers(node)
    merged = render_node(nk, baked["copy"], tmp_path / "baked", 1002)
    plate, _ = read_exr(tmp_path / "plate" / "plate.1002.exr")
    mine = np.stack([merged[c] for c in "RGB"], -1)
    expected = plate[..., :3] * (1.0 - composite[..., 7:8]) + composite[..., 4:7]
    np.testing.assert_allclose(mine, expected, atol=1e-6)
    np.testing.assert_allclose(mine, composite[..., :3], atol=2e-3)  # the engine's own (half) composite
    np.testing.assert_array_equal(merged["matte.A"], composite[..., 8])


def test_cancel_stops_a_real_job(
    nk: ModuleType, host: ModuleType, engine: EngineProcess, tmp_path: Path
) -> None:
    nk.scriptSaveAs(str(tmp_path / "sh030.nk"))
    read = plate_read(nk, write_plate(tmp_path / "plate"))
    read.setSelected(True)
    node = host.create_node(engine.address)
    node["prompt"].setValue("add a boat")
    node["steps"].setValue(200)
    host.generate(node)
    with EngineClient(engine.address) as client:
        nk._fake_process_events(until=lambda: bool(node["job_id"].value()), timeout=60)
        job = node["job_id"].value()
        for status in client.watch(job):
            if status.state == pb.JOB_STATE_RUNNING and status.step >= 1:
                break
        nk._fake_press(node, "cancel")
        assert wait_done(nk, host, node, timeout=120) == f"cancelled job {job}"
        final = client.status(job)
    assert final.state == pb.JOB_STATE_CANCELLED and final.step < 200
    assert not (tmp_path / "vera_cache" / "sh030" / job).exists()
