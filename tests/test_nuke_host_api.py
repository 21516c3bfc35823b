"""The Nuke node against the behaviour of Nuke's real API (as the fake models it, sources cited there): prompts
with TCL characters, createNode-like creation, script-relative paths, live previews, the input rendered in chunks
from a worker thread, takes and words a word-level model cannot read. Engine: the pass-through runner on loopback.
"""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import OpenImageIO as oiio
import pytest

from vera_engine.service.testing import PassThroughRunner
from vera_plugin import schema_ui
from vera_plugin.client import EngineClient

from .test_nuke import (
    InProcessEngine,
    SchemaRunner,
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


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[InProcessEngine]:
    eng = InProcessEngine(tmp_path / "spool", SchemaRunner())
    yield eng
    eng.stop()


def test_prompts_with_tcl_characters_reach_the_engine_as_typed(
    nk: ModuleType, host: ModuleType, engine: InProcessEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 2: Multiline_Eval_String_Knob.value() runs TCL ("[red]" is a command, "$5" a variable)."""
    monkeypatch.setenv("VERA_CACHE", str(tmp_path / "cache"))
    prompt = "add a [red] kite, $5 worth"
    node = make_vera(nk, host, engine.address, plate_read(nk, write_plate(tmp_path / "plate")), prompt)
    node["negative_prompt"].setValue("no $HOME, no [clock seconds]")
    with pytest.raises(RuntimeError, match='invalid command name "red"'):
        node["prompt"].value()  # what Nuke itself does with the text
    assert host.option_values(node)["prompt"] == prompt
    host.generate(node)
    assert wait_done(nk, host, node).startswith("done: ")
    with EngineClient(engine.address) as client:
        header = client.status(node["job_id"].value()).header
    assert header.prompt == prompt and header.negative_prompt == "no $HOME, no [clock seconds]"


def test_the_node_is_created_like_nukes_own_menus_create_nodes(
    nk: ModuleType, host: ModuleType, engine: InProcessEngine, tmp_path: Path
) -> None:
    read = plate_read(nk, write_plate(tmp_path / "plate"))
    read.setXYpos(300, 200)
    read.setSelected(True)
    steps_before = len(nk._STATE.undo_done)
    node = host.create_node(engine.address)
    assert node.input(0) == read
    assert node.xpos() == read.xpos() and node.ypos() > read.ypos()  # beside (below) the selection
    assert node.isSelected() and not read.isSelected()
    assert node.shown()  # its properties panel is open
    assert len(nk._STATE.undo_done) == steps_before + 1  # the node, its insides and knobs: one undo step
    assert nk.Undo.undoDescribe() == "Create Vera Edit"
    nk.Undo.undo()
    assert nk.toNode(node.name()) is None and nk.toNode(read.name()) is read
    assert not read.dependent()


def test_results_are_linked_relative_to_the_script(
    nk: ModuleType, host: ModuleType, engine: InProcessEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shot = tmp_path / "shows" / "sh010"
    shot.mkdir(parents=True)
    nk.scriptSaveAs(str(shot / "comp_v001.nk"))
    node = make_vera(nk, host, engine.address, plate_read(nk, write_plate(shot / "plate")))
    host.generate(node)
    wait_done(nk, host, node)
    job = node["job_id"].value()
    baked = host.bake_layers(node)
    expected = f"[file dirname [value root.name]]/vera_cache/comp_v001/{job}/vera_edit.####.exr"
    assert node.node("VeraResult")["file"].getText() == expected == baked["edit"]["file"].getText()
    nk.scriptSave()
    moved = tmp_path / "archive" / "sh010"
    shutil.copytree(shot, moved)
    shutil.rmtree(shot)
    # On a render farm without vera_plugin, the node's onCreate cannot relink: the relative path still resolves.
    monkeypatch.setitem(sys.modules, "vera_plugin.hosts.nuke", None)
    nk.scriptOpen(str(moved / "comp_v001.nk"))
    node = nk.toNode(node.name())
    assert node.node("VeraResult")["file"].evaluate() == (
        moved / "vera_cache" / "comp_v001" / job
    ).as_posix() + ("/vera_edit.####.exr")
    assert "edit.R" in render_node(nk, node, tmp_path / "check", 1002)
    # $VERA_CACHE outside the shot folder stays absolute.
    monkeypatch.setenv("VERA_CACHE", str(tmp_path / "central"))
    assert host._script_relative((tmp_path / "central" / "x.####.exr").as_posix()) == (
        (tmp_path / "central" / "x.####.exr").as_posix()
    )


def test_live_previews_show_in_the_node_output_while_the_job_runs(
    nk: ModuleType, host: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VERA_CACHE", str(tmp_path / "cache"))
    runner = PassThroughRunner(gate_step=1)
    eng = InProcessEngine(tmp_path / "spool", runner)
    try:
        node = make_vera(nk, host, eng.address, plate_read(nk, write_plate(tmp_path / "plate")))
        node["steps"].setValue(3)
        host.generate(node)
        nk._fake_process_events(until=lambda: node.node("VeraOutput")["which"].value() == 4, timeout=30)
        preview = node.node("VeraPreview")["file"].evaluate()
        assert preview.endswith(".png") and Path(preview).is_file()
        assert Path(preview).is_relative_to(tmp_path / "cache" / ".previews")
        out = render_node(nk, node, tmp_path / "check", 1002, channels="rgb")
        assert out["R"].shape == (20, 24)  # fitted to the plate's size
        # The preview is the engine's (sRGB, 8-bit) picture of the plate's middle frame.
        plate = oiio.ImageBuf((tmp_path / "plate" / "plate.1002.exr").as_posix()).get_pixels(oiio.FLOAT)
        expected = np.round(np.clip(np.asarray(plate)[..., 0], 0, 1) * 255) / 255
        np.testing.assert_allclose(out["R"], expected, atol=1 / 255 + 1e-6)
        runner.gate.set()
        assert wait_done(nk, host, node).startswith("done: ")
        assert node.node("VeraOutput")["which"].value() == 1  # the result now
        assert not Path(preview).exists() and node.node("VeraPreview")["file"].getText() == ""
    finally:
        eng.stop()


def test_the_input_renders_in_chunks_on_the_main_thread_while_the_gui_runs(
    nk: ModuleType, host: ModuleType, engine: InProcessEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VERA_CACHE", str(tmp_path / "cache"))
    frames = tuple(range(1001, 1011))
    node = make_vera(
        nk, host, engine.address, plate_read(nk, write_plate(tmp_path / "plate", frames), frames)
    )
    chunks: list[tuple[int, int, bool]] = []
    render_chunk = host._render_chunk

    def recorded(*args: Any) -> str:
        chunks.append((args[4], args[5], threading.current_thread() is threading.main_thread()))
        return render_chunk(*args)

    monkeypatch.setattr(host, "_render_chunk", recorded)
    assert host.generate(node) is not None
    assert chunks == []  # Generate returned at once: nothing was rendered in the button's call
    assert wait_done(nk, host, node).startswith("done: job ")
    assert [(a, b) for a, b, _ in chunks] == [(1001, 1004), (1005, 1008), (1009, 1010)]
    assert all(on_main for _, _, on_main in chunks)  # Nuke's graph touched on its main thread only
    task = nk._fake_progress_tasks()[-1]
    assert any(m.startswith("rendering the input: rendered src frames 1001-1004") for _, m in task.history)


def test_cancel_while_the_input_renders_submits_nothing(
    nk: ModuleType, host: ModuleType, engine: InProcessEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VERA_CACHE", str(tmp_path / "cache"))
    frames = tuple(range(1001, 1011))
    node = make_vera(
        nk, host, engine.address, plate_read(nk, write_plate(tmp_path / "plate", frames), frames)
    )
    render_chunk = host._render_chunk
    done: list[int] = []

    def then_cancel(*args: Any) -> str:
        done.append(args[4])
        nk._fake_progress_tasks()[-1]._cancelled = True  # the artist clicks the progress bar's cancel
        return render_chunk(*args)

    monkeypatch.setattr(host, "_render_chunk", then_cancel)
    host.generate(node)
    assert wait_done(nk, host, node) == "cancelled"
    assert done == [1001]  # it stopped after the chunk in progress
    with EngineClient(engine.address) as client:
        assert client.list_jobs() == []
    assert not list((tmp_path / "cache").glob(".upload-*"))
    assert not nk._fake_messages()


def test_takes_switch_without_regenerating(
    nk: ModuleType, host: ModuleType, engine: InProcessEngine, tmp_path: Path
) -> None:
    (tmp_path / "shot").mkdir()
    nk.scriptSaveAs(str(tmp_path / "shot" / "sh040.nk"))
    node = make_vera(nk, host, engine.address, plate_read(nk, write_plate(tmp_path / "plate")))
    node["takes"].setValue(3)  # the engine's option, from its schema
    node["seed"].setValue(500)
    host.generate(node)
    status = wait_done(nk, host, node)
    job = node["job_id"].value()
    assert status == f"done: job {job}, frames 1001-1003, seed 500, takes 1-3"
    assert node["take"].values() == ["1", "2", "3"] and node["take"].value() == "1"
    folder = tmp_path / "shot" / "vera_cache" / "sh040" / job
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"vera_edit.{f}.exr" for f in (1001, 1002, 1003)]
        + [f"vera_edit_take{k}.{f}.exr" for k in (2, 3) for f in (1001, 1002, 1003)]
    )
    nk._fake_user_set(node, "take", "2")
    read = node.node("VeraResult")
    assert read["file"].getText().endswith(f"/{job}/vera_edit_take2.####.exr")
    assert np.all(render_node(nk, node, tmp_path / "check", 1002)["edit.R"] == 0.125)  # take 2's edit
    header = oiio.ImageInput.open((folder / "vera_edit_take2.1002.exr").as_posix()).spec()
    assert header.getattribute("vera/seed") == "501"  # take k: seed + k - 1
    with EngineClient(engine.address) as client:
        assert len(client.list_jobs()) == 1  # switching takes did not regenerate
        assert client.status(job).header.takes == 3
    baked = host.bake_layers(node)
    assert baked["edit"]["file"].getText().endswith("vera_edit_take2.####.exr")
    assert "take 2" in baked["edit"]["label"].getText()
    nk.scriptSave()
    nk.scriptOpen(str(tmp_path / "shot" / "sh040.nk"))
    reopened = nk.toNode(node.name())
    assert reopened["take"].value() == "2" and reopened["take"].values() == ["1", "2", "3"]
    assert reopened.node("VeraResult")["file"].getText().endswith("vera_edit_take2.####.exr")
    assert reopened["status"].value() == f"cached result of job {job}: frames 1001-1003, takes 1, 2, 3"


def test_words_the_model_cannot_read_are_flagged_as_the_artist_types(
    nk: ModuleType, host: ModuleType, tmp_path: Path
) -> None:
    vocabulary = ("add", "a", "red", "ball", "rolling", "left", ",", "!")
    eng = InProcessEngine(tmp_path / "spool", SchemaRunner(vocabulary=vocabulary))
    try:
        node = host.create_node(eng.address)
        names = [k.name() for k in node.allKnobs()]
        assert names.index("prompt_words") == names.index("prompt") + 1  # right under the prompt
        nk._fake_user_set(node, "prompt", "Add a red KITE, quickly!")
        assert node["prompt_words"].value() == "unknown to this model: kite, quickly"
        nk._fake_user_set(node, "prompt", "add a red ball rolling left")
        assert node["prompt_words"].value() == ""
    finally:
        eng.stop()
    free_text = InProcessEngine(tmp_path / "spool2", SchemaRunner())
    try:
        assert host.create_node(free_text.address).knob("prompt_words") is None  # umT5 reads free text
    finally:
        free_text.stop()


def test_words_are_split_like_the_engines_word_tokenizer() -> None:
    from vera_engine.models.word_tokenizer import words_of

    for text in ("Add a red KITE, quickly!", "half-width — dashes...", "l'été 3 × 2", "  "):
        assert schema_ui.words_of(text) == words_of(text)
    assert schema_ui.unknown_words("a kite, a kite", ["a", ","]) == ["kite"]
    assert schema_ui.unknown_words("anything at all", []) == []
