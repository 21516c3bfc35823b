"""Issue 25 (Nuke items 9-11) and issue 28 item 1: the saved node's guard, the preview's Reformat, the script's
name read during load, and paths written into knobs Nuke evaluates as TCL. Against the fake ``nuke``, whose
behaviour (sources beside each modelled quirk) these tests rely on."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from vera_plugin.generate import GenerateRequest
from vera_proto.vera.v1 import engine_pb2 as pb

from .test_nuke import (
    InProcessEngine,
    _RaisingImport,
    fake_nuke_session,
    make_vera,
    plate_read,
    render_node,
    wait_done,
    write_plate,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def nk(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    yield from fake_nuke_session(monkeypatch)


@pytest.fixture
def host(nk: ModuleType) -> ModuleType:
    import importlib

    return importlib.import_module("vera_plugin.hosts.nuke.adapter")


def _version_error() -> Exception:
    from google.protobuf.runtime_version import VersionError

    return VersionError(
        "Detected incompatible Protobuf Gencode/Runtime versions when loading vera/v1/engine.proto: gencode "
        "7.35.1 runtime 5.29.0. Runtime version cannot be older than the linked gencode version."
    )


def test_a_saved_node_opens_with_a_protobuf_too_old_for_the_generated_code(
    nk: ModuleType, host: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 9: the node's own onCreate/knobChanged code (saved in the script) must catch protobuf's VersionError
    as menu.py does, not only ImportError: every script holding a Vera node would raise at load."""
    node = host.create_node("127.0.0.1:1", connect_timeout=0.1)
    node["job_id"].setValue("0" * 32)
    nk.scriptSaveAs(str(tmp_path / "shot.nk"))
    for name in [m for m in sys.modules if m.startswith("vera_plugin.hosts.nuke")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(
        sys, "meta_path", [_RaisingImport("vera_plugin.hosts.nuke", _version_error()), *sys.meta_path]
    )
    nk.scriptOpen(str(tmp_path / "shot.nk"))  # runs the saved onCreate: must not raise
    reopened = nk.toNode(node.name())
    nk._fake_user_set(reopened, "output", "edit")  # runs the saved knobChanged: must not raise either
    assert reopened["output"].value() == "edit"


def test_the_preview_is_fitted_to_the_plate_shape_not_its_own_aspect(
    nk: ModuleType, host: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 10: Reformat uses box_height only with box_fixed ("force this shape"); a square preview of a 24x20
    plate must still come out 24x20."""
    monkeypatch.setenv("VERA_CACHE", str(tmp_path / "cache"))
    node = host.create_node("127.0.0.1:1", connect_timeout=0.1)
    preview = tmp_path / "preview.png"
    host.write_png(preview, 8, 8, bytes([128, 64, 32]) * 64)
    host._RUNS[node.fullName()] = object()  # a Generate is running: the preview shows
    try:
        host._show_preview(node.fullName(), preview.as_posix(), (24, 20))
        out = render_node(nk, node, tmp_path / "check", 1, channels="rgb")
    finally:
        host._RUNS.clear()
    assert out["R"].shape == (20, 24)


def test_a_reopened_script_relinks_once_the_root_is_attached(
    nk: ModuleType, host: ModuleType, tmp_path: Path
) -> None:
    """Item 11: while a script loads, nuke.root() is not attached and its name cannot be read (tk-nuke-writenode
    #9/#22); the look-up waits for onScriptLoad instead of failing."""
    (tmp_path / "shot").mkdir()
    nk.scriptSaveAs(str(tmp_path / "shot" / "a.nk"))
    node = host.create_node("127.0.0.1:1", connect_timeout=0.1)
    job = "ab" * 16
    folder = tmp_path / "shot" / "vera_cache" / "a" / job
    folder.mkdir(parents=True)
    for frame in (1, 2):
        from vera_plugin.hosts.imagefiles import write_constant_exr

        write_constant_exr(
            folder / f"vera_edit.{frame:04d}.exr", 4, 4, {"R": 0.5, "G": 0.5, "B": 0.5, "A": 1.0}
        )
    node["job_id"].setValue(job)
    nk.scriptSave()
    nk.scriptOpen(str(tmp_path / "shot" / "a.nk"))
    assert nk.toNode(node.name())["status"].value() == f"cached result of job {job}: frames 1-2"


def test_paths_with_tcl_characters_are_escaped_in_file_knobs(
    nk: ModuleType, host: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 28 item 1: a Read's and Write's ``file`` is TCL to Nuke. A cache folder named ``[v2] $shot`` must
    be read as those characters, and an engine's job id can never run a command through the preview's Read."""
    cache = tmp_path / "cache [v2] $shot"
    monkeypatch.setenv("VERA_CACHE", str(cache))
    eng = InProcessEngine(tmp_path / "spool")
    try:
        node = make_vera(nk, host, eng.address, plate_read(nk, write_plate(tmp_path / "plate")))
        host.generate(node)
        assert wait_done(nk, host, node).startswith("done: "), node["status"].value()
        job = node["job_id"].value()
        read = node.node("VeraResult")["file"]
        assert read.evaluate() == (cache / job / "vera_edit.####.exr").as_posix()
        assert render_node(nk, node, tmp_path / "check", 1002, channels="rgb")["R"].shape == (20, 24)
    finally:
        eng.stop()
    # A hostile job id reaching the preview: written as text, never run (and never a path outside the folder).
    request = GenerateRequest("x", "p", {}, [1], "p.####.exr", cache)
    run = host._Run(node=node.fullName(), request=request, upload=tmp_path / "u", inputs=[],
                    preview_size=(24, 20), preview_dir=cache / ".previews")  # fmt: skip
    run.job_id = "[python -exec {open('/tmp/owned','w')}]/../../x"
    host._RUNS[node.fullName()] = run
    try:
        status = pb.JobStatus(preview=pb.Preview(width=2, height=2, rgb8=bytes(12)))
        host._save_preview(run, status)
        nk._fake_process_events(until=lambda: bool(node.node("VeraPreview")["file"].getText()), timeout=10)
    finally:
        host._RUNS.clear()
    shown = node.node("VeraPreview")["file"].evaluate()
    assert Path(shown).parent == cache / ".previews" and Path(shown).is_file(), shown


def test_generate_fetches_only_the_vera_results_the_job_lists(tmp_path: Path) -> None:
    """Issue 28 item 2, on the shared Generate (Nuke's node, the panel): names the engine lists that are not Vera
    results are refused before anything is fetched."""
    from vera_plugin.generate import GenerateError, result_names

    listed = pb.JobStatus(output_files=["vera_edit.1001.exr", "vera_edit_take2.1001.exr"])
    assert result_names("j", listed) == ["vera_edit.1001.exr", "vera_edit_take2.1001.exr"]
    for bad in (["vera_edit.1001.exr", ".bashrc"], ["../vera_edit.1001.exr"], []):
        with pytest.raises(GenerateError, match="Not fetched"):
            result_names("j", pb.JobStatus(output_files=bad))


def test_schema_option_names_never_become_callback_knobs(host: ModuleType) -> None:
    # Issue 28 item 13: an engine's schema names knobs; a name Nuke runs as code (a callback) or that is not an
    # identifier gets a prefix, so a lying engine cannot plant code in a callback knob.
    _knob_name = host._knob_name
    for name in (
        "knobChanged",
        "onCreate",
        "onDestroy",
        "updateUI",
        "autolabel",
        "beforeRender",
        "afterFrameRender",
    ):
        assert _knob_name(name) == f"opt_{name}"
    assert _knob_name("[python -exec {x}]") == "opt__python__exec__x__"
    assert _knob_name("steps") == "steps"
