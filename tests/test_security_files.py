"""Issue 28, engine side, files: a frame sent by path cannot escape --allow-root or freeze the engine once
submitted (items 3, 4), an EXR cannot make the engine decode more than the limits and the decode budget allow
(item 5), and the spool is the engine user's alone (item 13)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest

from vera_engine.imaging import exr
from vera_engine.service import safe_files
from vera_engine.service.pool.host import pack_inputs
from vera_engine.service.spool import InputError, Spool, SpooledInputs, read_frame
from vera_proto.vera.v1 import engine_pb2 as pb

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
SIZE = (24, 20)  # width, height


def _frame(path: Path, value: float) -> None:
    """An uncompressed RGB half EXR: two frames of one size have the same byte size, whatever their pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((SIZE[1], SIZE[0], 3), value, np.float32)
    exr.write_exr(path, pixels, ("R", "G", "B"), pixel_type="half", compression="none")


def _submit_path(spool: Spool, root: Path, path: Path, job: str = "job") -> Path:
    """Submit one plate frame by path, as the servicer does; returns the committed inputs folder."""
    header = pb.JobHeader(prompt="x", frames=[1])
    upload = spool.new_upload(header, [root])
    try:
        upload.add_chunk(
            pb.FrameChunk(layer=pb.LAYER_PLATE, frame=1, encoding=pb.ENCODING_PATH, path=str(path))
        )
        upload.finish()
        upload.commit(spool.inputs_dir(job))
    except BaseException:
        upload.discard()
        raise
    return spool.inputs_dir(job)


@pytest.fixture
def shots(tmp_path: Path) -> tuple[Spool, Path, Path, Path]:
    """A spool, an allowed root with shots/sh010/plate.1.exr (0.25) and the same file outside the root (0.75)."""
    root = tmp_path / "root"
    inside = root / "shots" / "sh010" / "plate.1.exr"
    outside = tmp_path / "secret" / "sh010" / "plate.1.exr"
    _frame(inside, 0.25)
    _frame(outside, 0.75)
    return Spool(tmp_path / "spool"), root, inside, outside


def _same_times(target: Path, like: Path) -> None:
    info = like.stat()
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))


def _readers(inputs: Path) -> dict[str, object]:
    spooled = SpooledInputs(inputs)
    return {
        "plate_frame": lambda: spooled.plate_frame(1),
        "windows": spooled.windows,
        "pack_inputs": lambda: list(pack_inputs(inputs).values()),  # read as the Ray backend does
    }


def test_a_folder_swapped_for_a_symlink_out_of_the_root_is_refused(shots) -> None:
    spool, root, inside, outside = shots
    inputs = _submit_path(spool, root, inside)
    assert SpooledInputs(inputs).plate_frame(1)[0, 0, 0] == 0.25
    # While the job is queued: the folder becomes a link to the outside copy, same sizes and times.
    _same_times(outside, inside)
    inside.parent.rename(inside.parent.with_name("sh010.old"))
    inside.parent.symlink_to(outside.parent)
    assert inside.stat().st_size == (inside.parent.with_name("sh010.old") / inside.name).stat().st_size
    for name, read in _readers(inputs).items():
        with pytest.raises(InputError, match="symbolic link") as err:
            read()
        assert "plate frame 1" in str(err.value), name


def test_the_frame_itself_swapped_for_a_symlink_is_refused(shots) -> None:
    spool, root, inside, outside = shots
    inputs = _submit_path(spool, root, inside)
    _same_times(outside, inside)
    inside.unlink()
    inside.symlink_to(outside)
    for read in _readers(inputs).values():
        with pytest.raises(InputError, match="symbolic link"):
            read()


def test_a_file_replaced_in_place_with_the_same_size_and_time_is_refused(shots) -> None:
    spool, root, inside, outside = shots
    inputs = _submit_path(spool, root, inside)
    copy = inside.with_name("copy.exr")
    shutil.copyfile(outside, copy)
    _same_times(copy, inside)
    os.replace(copy, inside)  # another inode at the same name, same size and modification time
    for read in _readers(inputs).values():
        with pytest.raises(InputError, match="changed after it was submitted \\(replaced by another file"):
            read()


def test_a_symlink_in_the_path_at_submit_is_refused_or_resolved_inside(shots) -> None:
    spool, root, inside, _outside = shots
    (root / "alias").symlink_to(inside.parent)  # a link inside the root to inside the root: resolved, fine
    inputs = _submit_path(spool, root, root / "alias" / inside.name)
    assert json.loads((inputs / "manifest.json").read_text())["plate"]["1"]["path"] == str(inside)
    assert SpooledInputs(inputs).plate_frame(1)[0, 0, 0] == 0.25


_FIFO_SCRIPT = """
import os, sys, time
from pathlib import Path
from vera_engine.service.spool import InputError, SpooledInputs
from vera_engine.service.pool.host import pack_inputs

inputs, how = Path(sys.argv[1]), sys.argv[2]
spooled = SpooledInputs(inputs)
read = {"plate_frame": lambda: spooled.plate_frame(1), "windows": spooled.windows,
        "pack_inputs": lambda: list(pack_inputs(inputs).values())}[how]
try:
    read()
    print("READ")
except InputError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize("how", ["plate_frame", "windows", "pack_inputs"])
def test_a_frame_swapped_for_a_fifo_is_refused_without_blocking(shots, how: str) -> None:
    spool, root, inside, _outside = shots
    inputs = _submit_path(spool, root, inside)
    inside.unlink()
    os.mkfifo(inside)  # nobody ever writes: opening it for reading by name blocks forever
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("engine", "plugin", "proto"))}
    try:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_FIFO_SCRIPT), str(inputs), how],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{how} blocked on a FIFO")
    assert result.stdout.startswith("REFUSED"), result.stdout + result.stderr
    assert "is not a file (it is a FIFO)" in result.stdout


def test_a_fifo_or_device_at_submit_is_refused(shots) -> None:
    spool, root, inside, _outside = shots
    fifo = inside.with_name("plate.2.exr")
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"is not a file \(it is a FIFO\)"):
        _submit_path(spool, root, fifo)
    with pytest.raises(InputError, match=r"is not a file \(it is a device\)"):
        _submit_path(spool, Path("/dev"), Path("/dev/zero"))


def test_open_regular_follows_no_link_anywhere(tmp_path: Path) -> None:
    real = tmp_path / "a" / "b.exr"
    real.parent.mkdir()
    real.write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    fd = safe_files.open_regular(real)
    os.close(fd)
    with pytest.raises(safe_files.UnsafeFile, match="symbolic link"):
        safe_files.open_regular(tmp_path / "link" / "b.exr")
    with pytest.raises(safe_files.UnsafeFile, match="normalised"):
        safe_files.open_regular(f"{tmp_path}/a/../a/b.exr")
    with pytest.raises(FileNotFoundError):
        safe_files.open_regular(tmp_path / "a" / "missing.exr")


# ---------------------------------------------------------------------------------------------------------
# Decompression bombs and the decode budget


def _bomb(path: Path, width: int, height: int, pad: int = 1 << 20) -> Path:
    """A small EXR whose header declares ``width`` x ``height`` RGBA half: a 16x16 file with its data window
    rewritten, padded so that OpenImageIO's own ratio check lets it through (as the issue's 2.2 MB file did)."""
    exr.write_exr(path, np.zeros((16, 16, 4), np.float32), "RGBA", pixel_type="half", compression="zip")
    data = bytearray(path.read_bytes())
    key = b"dataWindow\x00box2i\x00"
    at = data.index(key) + len(key) + 4
    struct.pack_into("<4i", data, at, 0, 0, width - 1, height - 1)
    path.write_bytes(bytes(data) + bytes(pad))
    return path


@pytest.fixture
def no_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) any pixel decode, so a test shows the refusal came before it."""
    calls: list[str] = []

    def read_pixels(inp: object, path: str, *args: object) -> None:
        calls.append(path)
        raise AssertionError("decoded")

    monkeypatch.setattr(exr, "_read_pixels", read_pixels)  # the one place exr.py decodes pixels
    return calls


def test_a_header_beyond_the_published_limits_is_refused_before_decoding(tmp_path: Path, no_decode) -> None:
    bomb = _bomb(tmp_path / "wide.exr", 16385, 16)
    with pytest.raises(exr.PlateError, match=r"declares a data window of 16385x16 pixels.*16\.\.16384"):
        read_frame(bomb, pb.LAYER_PLATE)
    many = tmp_path / "many.exr"
    spec = oiio.ImageSpec(16, 16, 65, "half")
    out = oiio.ImageOutput.create(str(many))
    out.open(str(many), spec)
    out.write_image(np.zeros((16, 16, 65), np.float16))
    out.close()
    with pytest.raises(exr.PlateError, match="declares 65 channels; at most 64"):
        read_frame(many, pb.LAYER_PLATE)
    with pytest.raises(exr.PlateError, match="declares 65 channels; at most 64"):
        read_frame(many, pb.LAYER_MASK)
    assert no_decode == []


def test_a_bomb_within_the_limits_is_refused_when_over_the_decode_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_decode
) -> None:
    monkeypatch.setattr(safe_files, "DECODE", safe_files.DecodeBudget(1024**3))
    bomb = _bomb(tmp_path / "bomb.exr", 16384, 16384)
    assert bomb.stat().st_size < 2 * 1024**2
    with pytest.raises(exr.PlateError, match=r"needs 8\.00 GiB of memory, more than .* 1\.00 GiB"):
        read_frame(bomb, pb.LAYER_PLATE)
    spool = Spool(tmp_path / "spool")
    upload = spool.new_upload(pb.JobHeader(prompt="x", frames=[1]), [])
    data = bomb.read_bytes()
    upload.add_chunk(
        pb.FrameChunk(
            layer=pb.LAYER_PLATE, frame=1, encoding=pb.ENCODING_EXR, total_size=len(data), offset=0, data=data
        )
    )
    with pytest.raises(
        InputError, match=r"plate frame 1: not a usable OpenEXR frame: decoding it needs 8\.00 GiB"
    ):
        upload.finish()
    upload.discard()
    assert no_decode == []


def test_concurrent_decodes_stay_within_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = tmp_path / "f.exr"
    _frame(frame, 0.5)
    cost = safe_files.decode_cost(SIZE[0], SIZE[1], 3)
    budget = safe_files.DecodeBudget(2 * cost)  # room for two decodes at a time
    monkeypatch.setattr(safe_files, "DECODE", budget)
    in_flight: list[int] = []
    real_read = exr._read_pixels

    def slow_read(*args: object) -> object:
        in_flight.append(budget.in_use)  # inside the decode's hold on the budget
        time.sleep(0.05)
        return real_read(*args)

    monkeypatch.setattr(exr, "_read_pixels", slow_read)
    threads = [threading.Thread(target=read_frame, args=(frame, pb.LAYER_PLATE)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(in_flight) == 6 and budget.in_use == 0
    assert budget.peak == 2 * cost and max(in_flight) <= 2 * cost


def test_the_budget_blocks_then_admits(tmp_path: Path) -> None:
    budget = safe_files.DecodeBudget(100)
    admitted = threading.Event()
    with budget.reserve(80):

        def second() -> None:
            with budget.reserve(50):
                admitted.set()

        thread = threading.Thread(target=second)
        thread.start()
        assert not admitted.wait(0.2)  # 80 + 50 > 100: waits
    assert admitted.wait(5)
    thread.join(5)
    with pytest.raises(safe_files.DecodeBudget.OverBudget, match="more than this engine's decode budget"):
        budget.reserve(101)


# ---------------------------------------------------------------------------------------------------------
# The spool is private


def test_spool_folders_are_0700_and_frame_files_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        spool = Spool(tmp_path / "spool")
        upload = spool.new_upload(pb.JobHeader(prompt="x", frames=[1]), [])
        data = np.full((16, 16, 3), 0.5, np.float32).tobytes()
        raw = pb.RawFormat(width=16, height=16, channels=3, sample_type=pb.SAMPLE_TYPE_FLOAT32)
        upload.add_chunk(
            pb.FrameChunk(
                layer=pb.LAYER_PLATE,
                frame=1,
                encoding=pb.ENCODING_RAW,
                raw=raw,
                total_size=len(data),
                offset=0,
                data=data,
            )
        )
        upload.finish()
        upload.commit(spool.inputs_dir("job"))
    finally:
        os.umask(old)
    for folder in (spool.root, spool.incoming, spool.jobs, spool.inputs_dir("job")):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for file in spool.inputs_dir("job").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_a_frame_is_opened_once_to_check_and_decode_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One EXR reader (imaging/exr.py): the header check, the decode budget and the pixels share one open."""
    frame = tmp_path / "f.exr"
    _frame(frame, 0.5)
    opened: list[str] = []
    real_oiio = exr.oiio

    class CountingImageInput:
        @staticmethod
        def open(path: str) -> object:
            opened.append(path)
            return real_oiio.ImageInput.open(path)

    class CountingOiio:
        ImageInput = CountingImageInput

        def __getattr__(self, name: str) -> object:
            return getattr(real_oiio, name)

    monkeypatch.setattr(exr, "oiio", CountingOiio())
    mask = tmp_path / "m.exr"
    exr.write_exr(mask, np.ones((SIZE[1], SIZE[0], 1), np.float32), ("A",), pixel_type="half")
    assert read_frame(frame, pb.LAYER_PLATE).shape == (SIZE[1], SIZE[0], 3)
    assert read_frame(mask, pb.LAYER_MASK).shape == (SIZE[1], SIZE[0], 1)
    assert opened == [str(frame), str(mask)]
