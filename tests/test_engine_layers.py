"""The engine's data path around the model (issue 15), through a real engine with a scripted pipeline whose output
is known: layers that composite like the model, previews decoded only for a watcher, takes, window options, and
plates that are read frame by frame instead of held whole."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vera_engine.imaging import exr
from vera_engine.imaging.colour import ColourConverter
from vera_engine.imaging.plate_layers import FrameLayers, finish_frames
from vera_engine.pipelines.edit_plate import sample_plate
from vera_engine.pipelines.windows import default_window_overlap
from vera_engine.service import Engine, create_server
from vera_engine.service.runner import PipelineRunner
from vera_plugin.client import EngineClient, state_name

FRAMES = [1001, 1002, 1003, 1004]
BLACK = np.zeros(3, np.float32)
RED = np.array([0.9, 0.15, 0.1], np.float32)


class _NoVocabulary:
    unk_token_id = None


class ScriptedPipeline:
    """The `VeraPipeline` call surface with a known output: a soft black shadow (alpha 0.4) in the top half and a
    red disc with a feathered edge in the bottom half, at whatever size it is given. Records its calls and counts
    its preview decodes."""

    native_size = (32, 32)
    native_frames = 8
    tokenizer = _NoVocabulary()
    transformer = None

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.preview_decodes: list[int | None] = []
        self.interrupt = False

    @staticmethod
    def layers(frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        alpha = np.zeros((height, width), np.float32)
        alpha[: height // 2] = 0.4  # the shadow
        radius = np.hypot(yy - 0.75 * height, xx - width / 2)
        disc = np.clip((0.2 * height - radius) / 3.0, 0.0, 1.0)  # a 3-pixel feather
        bottom = yy >= height / 2
        alpha[bottom] = disc[bottom]
        edit = np.where(bottom[..., None], RED, BLACK).astype(np.float32)
        return np.broadcast_to(edit, (frames, height, width, 3)).copy(), np.broadcast_to(
            alpha, (frames, height, width)
        ).copy()

    def decode_preview(self, composite_x0: Any, frame: int | None = None) -> np.ndarray:
        self.preview_decodes.append(frame)
        return np.zeros((1 if frame is not None else 4, 8, 8, 3), np.float32)

    def __call__(self, video, *, prompt, mask=None, generator=None, **kwargs):
        self.calls.append({"prompt": prompt, "seed": generator.initial_seed(), "mask": mask, **kwargs})
        steps = kwargs["num_inference_steps"]
        callback = kwargs.get("callback_on_step_end")
        for step in range(steps):
            if self.interrupt:
                from vera_engine.pipelines.pipeline_vera import VeraInterrupted

                raise VeraInterrupted(step, steps)
            if callback is not None:
                callback(self, step, None, {"composite_x0": None})
        edit, alpha = self.layers(*video.shape[:3])

        class Out:
            pass

        out = Out()
        out.edit, out.alpha = edit, alpha
        out.composite = video * (1 - alpha[..., None]) + edit * alpha[..., None]
        return out


class ScriptedRunner(PipelineRunner):
    """The real runner (the code under test) with the scripted pipeline in place of a loaded checkpoint."""

    def load(self) -> None:
        self.hash = "scripted"
        self.pipe = ScriptedPipeline()


@pytest.fixture
def engine(tmp_path: Path):
    runner = ScriptedRunner("default", device="cpu")
    engine = Engine(tmp_path / "spool", runner)
    server, port = create_server(engine, "127.0.0.1", 0)
    engine.start()
    server.start()
    yield runner, f"127.0.0.1:{port}"
    server.stop(0).wait()
    engine.stop()


def _plate(tmp_path: Path, height: int = 64, width: int = 96) -> str:
    colour = ColourConverter("ACEScg")
    rng = np.random.default_rng(0)
    model_space = rng.uniform(0.1, 0.9, (len(FRAMES), height, width, 3)).astype(np.float32)
    model_space[..., : width // 3, :] = 0.5  # a mid-grey third, under the shadow
    pattern = str(tmp_path / "plate" / "plate.####.exr")
    exr.write_sequence(pattern, colour.from_model(model_space), FRAMES, ("R", "G", "B"), pixel_type="float")
    return pattern


def _run(address: str, pattern: str, watch_previews: bool = False, **options: Any) -> tuple[Any, list[Path]]:
    with EngineClient(address) as client:
        client.wait_until_serving(timeout=60)
        job = client.submit_files(pattern, FRAMES, prompt="add a red disc", seed=5, steps=3, **options)
        final = client.wait(job, previews=watch_previews) if watch_previews else client.wait(job)
        assert state_name(final.state) == "succeeded", final.error
        return final, client.fetch(job, Path(pattern).parent.parent / f"out-{job}")


def test_a_soft_shadow_and_a_feathered_edge_composite_like_the_model(engine, tmp_path: Path) -> None:
    from vera_engine.imaging.composite import snap_matte
    from vera_engine.imaging.resize import guided_upsample, unfit_frames

    _runner, address = engine
    pattern = _plate(tmp_path)
    # The raw matte (no clip black / white): this checks how the layers composite, with the model's own 0.4 shadow.
    _final, paths = _run(address, pattern, bit_depth="float", clip_black=0.0, clip_white=1.0)
    colour = ColourConverter("ACEScg")
    plate = exr.read_plate(pattern, FRAMES).pixels
    # The model's layers at plate resolution, as the engine upsamples them (matte guided by the plate).
    model = sample_plate(ScriptedPipeline(), plate, prompt="p", colour=colour, steps=1)
    for index, path in enumerate(sorted(paths)):
        layers = exr.read_layers(path)
        composite, edit, matte = layers["composite"], layers["edit"], layers["matte"]
        rgb = plate[index, ..., :3]
        model_plate = colour.to_model(rgb)
        alpha = snap_matte(
            guided_upsample(
                model.alpha[index : index + 1],
                model_plate[None],
                model.mapping,
                low_guide=model.guides[index : index + 1],
            )
        )[0]
        edit_model = np.clip(unfit_frames(model.edit[index : index + 1], model.mapping), 0, 1)[0]
        a = alpha[..., None]
        # The model's composite, formed in its own space, brought to the working space.
        target = colour.from_model(model_plate * (1 - a) + edit_model * a)
        soft = (alpha > 0) & (alpha < 1)
        shadow = soft & np.isclose(alpha, 0.4)
        edge = soft & ~np.isclose(alpha, 0.4)
        assert shadow.sum() > 1000 and edge.sum() > 50
        # Stated tolerance: OpenColorIO's float round trip of the plate (~1e-5 relative) and float rounding.
        np.testing.assert_allclose(composite[..., :3][shadow], target[shadow], rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(composite[..., :3][edge], target[edge], rtol=2e-4, atol=2e-5)
        # The soft shadow over mid-grey: 0.30 in the model's space, where a linear over at 0.4 would give 0.394.
        grey = shadow & np.isclose(model_plate, 0.5, atol=1e-3).all(axis=-1)
        assert grey.sum() > 100
        np.testing.assert_allclose(colour.to_model(composite[..., :3][grey]), 0.30, atol=1e-3)
        # A linear Merge (over) of the delivered edit on the plate gives the delivered composite.
        over = rgb * (1 - matte[..., None]) + edit[..., :3]
        np.testing.assert_allclose(over[soft], composite[..., :3][soft], rtol=1e-5, atol=1e-6)
        # The engine resamples as banded tensor products: its matte may differ from the numpy path by float rounding.
        assert (edit >= 0).all() and (matte >= alpha - 1e-6).all(), (alpha - matte).max()
        # Bit-exact where the matte is 0 (float output of a float plate).
        untouched = matte == 0
        np.testing.assert_array_equal(composite[..., :3][untouched], rgb[untouched])


def test_previews_are_decoded_only_while_someone_watches_them(engine, tmp_path: Path) -> None:
    runner, address = engine
    pattern = _plate(tmp_path, 32, 32)
    _run(address, pattern)
    assert runner.pipe.preview_decodes == []  # nobody asked: no decode at all
    _run(address, pattern, watch_previews=True)
    # A watcher: previews, each decoding the one frame it shows (the middle one), not the whole clip.
    assert runner.pipe.preview_decodes and set(runner.pipe.preview_decodes) == {len(FRAMES) // 2}


def test_takes_are_one_job_with_consecutive_seeds_and_files_per_take(engine, tmp_path: Path) -> None:
    runner, address = engine
    pattern = _plate(tmp_path, 32, 32)
    final, paths = _run(address, pattern, takes=3)
    assert [call["seed"] for call in runner.pipe.calls] == [5, 6, 7]
    names = sorted(p.name for p in paths)
    expected = sorted(
        f"{stem}.{frame}.exr"
        for stem in ("vera_edit", "vera_edit_take2", "vera_edit_take3")
        for frame in FRAMES
    )
    assert names == expected and sorted(final.output_files) == expected
    assert final.total_steps == 9 and final.step == 9
    take3 = next(p for p in paths if p.name == "vera_edit_take3.1001.exr")
    assert exr.read_exr(take3)[2].getattribute("vera/take") in (3, "3")


def test_window_options_reach_the_pipeline_and_are_checked_at_submit(engine, tmp_path: Path) -> None:
    runner, address = engine
    pattern = _plate(tmp_path, 32, 32)
    _run(address, pattern, window_frames=2, window_overlap=1)
    assert runner.pipe.calls[-1]["window_frames"] == 2 and runner.pipe.calls[-1]["window_overlap"] == 1
    _run(address, pattern, window_frames=8)
    assert runner.pipe.calls[-1]["window_overlap"] == default_window_overlap(8) == 2
    with EngineClient(address) as client:
        model = client.info().models[0]
        spec = {o.name: o for o in model.options}
        assert spec["window_frames"].default.int_value == model.frame_window
        assert model.max_window_frames == spec["window_frames"].max
        # The engine's default overlap is the pipeline's own rule (pipelines/windows.py), for any window asked.
        assert spec["window_overlap"].default.int_value == default_window_overlap(model.frame_window)
        from vera_plugin.client import EngineError

        with pytest.raises(EngineError, match="window_overlap") as error:
            client.submit_files(pattern, FRAMES, prompt="p", window_frames=2, window_overlap=2)
        assert error.value.code == "INVALID_ARGUMENT"


class _LiveFrames:
    """A plate read on demand that counts how many of its frames are alive at once."""

    def __init__(self, frames: int, height: int, width: int) -> None:
        self.frames, self.shape = frames, (height, width, 4)
        self.alive = 0
        self.most_alive = 0
        self.reads = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.frames

    def _gone(self) -> None:
        with self._lock:
            self.alive -= 1

    def __getitem__(self, index: int) -> np.ndarray:
        frame = np.full(self.shape, 0.18 + 0.01 * index, np.float32)
        with self._lock:
            self.reads += 1
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(frame, self._gone)
        return frame


def test_the_plate_is_read_frame_by_frame_never_held_whole() -> None:
    colour = ColourConverter("ACEScg")
    plate = _LiveFrames(24, 48, 64)
    model = sample_plate(ScriptedPipeline(), plate, prompt="p", colour=colour, steps=1, workers=2)
    assert plate.reads == 24 and plate.most_alive <= 3  # the model-size copy: a few frames at a time
    plate.most_alive = 0
    written: dict[int, FrameLayers] = {}
    finish_frames(
        model, plate, colour, lambda i, layers: written.__setitem__(i, layers.matte.sum()), workers=2
    )
    assert sorted(written) == list(range(24)) and plate.reads == 48
    assert plate.most_alive <= 3  # at most `workers` frames (and the one being handed over) in memory at once


def test_vera_edit_asks_for_takes_and_windows(engine, tmp_path: Path) -> None:
    from vera_plugin.cli import main

    runner, address = engine
    pattern = _plate(tmp_path, 32, 32)
    out = tmp_path / "cli-out"
    args = [
        "edit",
        "--engine",
        address,
        "--plate",
        pattern,
        "--frames",
        "1001-1004",
        "--prompt",
        "add a ball",
    ]
    assert (
        main(
            [*args, "--takes", "2", "--window", "2", "--overlap", "1", "--seed", "3", "--out", str(out), "-q"]
        )
        == 0
    )
    assert [call["seed"] for call in runner.pipe.calls] == [3, 4]
    assert {(call["window_frames"], call["window_overlap"]) for call in runner.pipe.calls} == {(2, 1)}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("vera_edit_take2.")) == [
        f"vera_edit_take2.{frame}.exr" for frame in FRAMES
    ]
