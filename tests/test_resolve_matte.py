"""vera_plugin.hosts.resolve.matte: the matte.A channel of Vera's layered EXRs as grey EXRs Resolve can take as a
clip matte, read and written without OpenImageIO (checked against OpenImageIO)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest

from vera_engine.imaging.exr import Window, write_exr, write_layered_exr
from vera_plugin.hosts.resolve.matte import MatteError, read_channel, write_grey_exr, write_mattes


def _oiio(path: Path) -> tuple[np.ndarray, oiio.ImageSpec]:
    buf = oiio.ImageBuf(str(path))
    assert not buf.has_error, buf.geterror()
    return np.asarray(buf.get_pixels(oiio.FLOAT)), buf.spec()


@pytest.mark.parametrize("compression", ["zip", "zips", "none", "rle"])
@pytest.mark.parametrize("pixel_type", ["half", "float"])
def test_reads_the_matte_of_layered_results(tmp_path: Path, compression: str, pixel_type: str) -> None:
    rng = np.random.default_rng(1)
    rgba, edit = rng.random((37, 29, 4), dtype=np.float32), rng.random((37, 29, 4), dtype=np.float32)
    matte = rng.random((37, 29), dtype=np.float32)
    path = write_layered_exr(
        tmp_path / "vera_edit.1001.exr", rgba, edit, matte, pixel_type=pixel_type, compression=compression
    )
    values, header = read_channel(path, "matte.A")
    reference, spec = _oiio(path)
    np.testing.assert_array_equal(values, reference[..., spec.channelnames.index("matte.A")])
    np.testing.assert_array_equal(
        read_channel(path, "edit.G")[0], reference[..., spec.channelnames.index("edit.G")]
    )
    assert header.data_window == (0, 0, 28, 36)


def test_writes_grey_mattes_with_the_windows_of_the_results(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    data, display = Window(-3, -2, 29, 37), Window(0, 0, 20, 30)
    rgba = rng.random((37, 29, 4), dtype=np.float32)
    for frame in (1001, 1002):
        pixels = np.concatenate([rgba, rgba, rgba[..., :1] * frame / 2000], -1)
        write_exr(tmp_path / f"vera_edit.{frame}.exr", pixels, ["R", "G", "B", "A", "edit.R", "edit.G",
                  "edit.B", "edit.A", "matte.A"], data_window=data, display_window=display)  # fmt: skip
    files = sorted(tmp_path.glob("vera_edit.*.exr"))
    mattes = write_mattes(files, tmp_path / "matte")
    assert [m.name for m in mattes] == ["vera_edit.1001.exr", "vera_edit.1002.exr"]
    for frame, matte in zip((1001, 1002), mattes, strict=True):
        grey, spec = _oiio(matte)
        assert spec.channelnames == ("R", "G", "B", "A") and spec.format == oiio.HALF
        assert (spec.x, spec.y, spec.width, spec.height) == (-3, -2, 29, 37)
        assert (spec.full_x, spec.full_y, spec.full_width, spec.full_height) == (0, 0, 20, 30)
        expected = (rgba[..., 0] * frame / 2000).astype(np.float16).astype(np.float32)
        for c in range(4):
            np.testing.assert_array_equal(grey[..., c], expected)
    with pytest.raises(MatteError, match="does not match"):
        write_grey_exr(tmp_path / "bad.exr", np.zeros((4, 4)), (0, 0, 4, 4), (0, 0, 4, 4))


def test_unreadable_results_give_no_mattes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    piz = write_layered_exr(tmp_path / "vera_edit.0001.exr", rng.random((16, 16, 4), dtype=np.float32),
                            np.zeros((16, 16, 4), np.float32), np.zeros((16, 16), np.float32), compression="piz")  # fmt: skip
    assert write_mattes([piz], tmp_path / "matte") is None
    with pytest.raises(MatteError, match="compression 4"):
        read_channel(piz, "matte.A")
    plain = write_exr(tmp_path / "plate.exr", np.zeros((16, 16, 3), np.float32), "RGB")
    with pytest.raises(MatteError, match=r"no channel 'matte\.A'; it has \['B', 'G', 'R'\]"):
        read_channel(plain, "matte.A")
    (tmp_path / "x.exr").write_bytes(b"not an exr at all")
    with pytest.raises(MatteError, match="not an OpenEXR file"):
        read_channel(tmp_path / "x.exr", "matte.A")


def test_damaged_results_are_a_matte_error_not_a_zlib_traceback(tmp_path: Path) -> None:
    """A result cut short (a download interrupted, a full disk): a MatteError naming the file, and no mattes."""
    rng = np.random.default_rng(4)
    path = write_layered_exr(tmp_path / "vera_edit.1001.exr", rng.random((40, 24, 4), dtype=np.float32),
                             rng.random((40, 24, 4), dtype=np.float32), rng.random((40, 24), dtype=np.float32))  # fmt: skip
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])  # the last chunk's compressed data cut short
    with pytest.raises(MatteError, match=r"vera_edit\.1001\.exr: damaged EXR data \(error: "):
        read_channel(path, "matte.A")
    assert write_mattes([path], tmp_path / "matte") is None
    (tmp_path / "head.exr").write_bytes(data[:40])  # not even a whole header
    with pytest.raises(MatteError, match="damaged EXR header"):
        read_channel(tmp_path / "head.exr", "matte.A")
