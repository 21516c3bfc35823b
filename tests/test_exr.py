"""EXR/movie plate I/O: inputs written and outputs checked with the independent OpenEXR reader."""

from __future__ import annotations

import os

import numpy as np
import OpenEXR
import pytest

from vera_engine.imaging import exr
from vera_engine.imaging.exr import PlateError, Window

RNG = np.random.default_rng(7)


def _write_independent(
    path,
    pixels: np.ndarray,
    *,
    names: str = "RGBA",
    dtype=np.float16,
    compression=OpenEXR.ZIP_COMPRESSION,
    tiled: bool = False,
    data_origin: tuple[int, int] = (0, 0),
    display: tuple[int, int, int, int] | None = None,
) -> None:
    """Write an EXR with the OpenEXR package (not OpenImageIO), so the reader is tested against another writer."""
    height, width = pixels.shape[:2]
    x0, y0 = data_origin
    header = {
        "compression": compression,
        "type": OpenEXR.tiledimage if tiled else OpenEXR.scanlineimage,
        "dataWindow": (np.array([x0, y0], np.int32), np.array([x0 + width - 1, y0 + height - 1], np.int32)),
    }
    if display is not None:
        dx, dy, dw, dh = display
        header["displayWindow"] = (
            np.array([dx, dy], np.int32),
            np.array([dx + dw - 1, dy + dh - 1], np.int32),
        )
    else:
        header["displayWindow"] = header["dataWindow"]
    if tiled:
        tiles = OpenEXR.TileDescription()
        tiles.xSize, tiles.ySize, tiles.mode = 16, 16, OpenEXR.ONE_LEVEL
        header["tiles"] = tiles
    channels = {name: np.ascontiguousarray(pixels[..., i].astype(dtype)) for i, name in enumerate(names)}
    OpenEXR.File(header, channels).write(str(path))


def _read_independent(path) -> tuple[dict, dict[str, np.ndarray]]:
    with OpenEXR.File(str(path), separate_channels=True) as f:
        return dict(f.header()), {name: ch.pixels.copy() for name, ch in f.channels().items()}


# ------------------------------------------------------------------------------------------------ patterns
@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("/p/plate.####.exr", "/p/plate.0012.exr"),
        ("/p/plate.%04d.exr", "/p/plate.0012.exr"),
        ("/p/plate.%d.exr", "/p/plate.12.exr"),
        ("/p/plate_@@@.exr", "/p/plate_012.exr"),
        ("/p#1/plate.######.exr", "/p#1/plate.000012.exr"),
    ],
)
def test_frame_path_expands_the_frame_token(pattern, expected):
    assert exr.frame_path(pattern, 12) == expected


@pytest.mark.parametrize("pattern", ["/p/plate.exr", "/p/plate.####.%04d.exr"])
def test_frame_path_needs_exactly_one_token(pattern):
    with pytest.raises(PlateError, match="exactly one frame token"):
        exr.frame_path(pattern, 1)


def test_find_frames_lists_existing_frames(tmp_path):
    for f in (3, 1, 10):
        (tmp_path / f"p.{f:04d}.exr").write_bytes(b"")
    (tmp_path / "p.abcd.exr").write_bytes(b"")
    assert exr.find_frames(str(tmp_path / "p.####.exr")) == [1, 3, 10]


# ------------------------------------------------------------------------------------------------ reading
@pytest.mark.parametrize(
    ("names", "dtype", "compression", "tiled"),
    [
        ("RGBA", np.float16, OpenEXR.ZIP_COMPRESSION, False),
        ("RGB", np.float32, OpenEXR.PIZ_COMPRESSION, True),
        ("RGBA", np.float32, OpenEXR.NO_COMPRESSION, False),
        ("RGB", np.float16, OpenEXR.RLE_COMPRESSION, True),
        ("RGBA", np.float16, OpenEXR.ZIPS_COMPRESSION, False),
        ("RGBA", np.float16, OpenEXR.PXR24_COMPRESSION, True),
        ("RGBA", np.float16, OpenEXR.B44_COMPRESSION, False),
        ("RGB", np.float16, OpenEXR.DWAA_COMPRESSION, False),
    ],
)
def test_read_plate_any_storage(tmp_path, names, dtype, compression, tiled):
    frames = np.stack([RNG.uniform(-0.5, 8.0, (20, 36, len(names))) for _ in range(3)]).astype(dtype)
    for i, f in enumerate((7, 8, 9)):
        _write_independent(
            tmp_path / f"plate.{f:04d}.exr",
            frames[i],
            names=names,
            dtype=dtype,
            compression=compression,
            tiled=tiled,
        )
    plate = exr.read_plate(str(tmp_path / "plate.%04d.exr"), range(7, 10))
    assert plate.pixels.shape == (3, 20, 36, len(names)) and plate.pixels.dtype == np.float32
    assert plate.channels == tuple(names) and plate.frames == [7, 8, 9]
    assert plate.pixel_type == ("half" if dtype == np.float16 else "float")
    # Lossy files: the decoded values must match what the OpenEXR library itself decodes.
    for i, f in enumerate((7, 8, 9)):
        _header, decoded = _read_independent(tmp_path / f"plate.{f:04d}.exr")
        expected = np.stack([decoded[c] for c in names], axis=-1).astype(np.float32)
        np.testing.assert_array_equal(plate.pixels[i], expected)
    if compression not in (OpenEXR.B44_COMPRESSION, OpenEXR.DWAA_COMPRESSION):
        np.testing.assert_array_equal(plate.pixels, frames.astype(np.float32))


def test_read_plate_keeps_overscan_or_fits_display_window(tmp_path):
    pixels = RNG.uniform(0, 1, (24, 40, 4)).astype(np.float16)
    # Data window (-4, -2)..(35, 21) overscans the 32x18 display window.
    _write_independent(tmp_path / "o.0001.exr", pixels, data_origin=(-4, -2), display=(0, 0, 32, 18))
    plate = exr.read_plate(str(tmp_path / "o.####.exr"), [1])
    assert plate.data_window == Window(-4, -2, 40, 24) and plate.display_window == Window(0, 0, 32, 18)
    np.testing.assert_array_equal(plate.pixels[0], pixels.astype(np.float32))

    shown = exr.read_plate(str(tmp_path / "o.####.exr"), [1], window="display")
    assert shown.pixels.shape == (1, 18, 32, 4) and shown.data_window == Window(0, 0, 32, 18)
    np.testing.assert_array_equal(shown.pixels[0], pixels[2:20, 4:36].astype(np.float32))


def test_read_plate_display_window_pads_a_smaller_data_window(tmp_path):
    pixels = RNG.uniform(0, 1, (4, 6, 3)).astype(np.float16)
    _write_independent(
        tmp_path / "b.0001.exr", pixels, names="RGB", data_origin=(2, 3), display=(0, 0, 10, 8)
    )
    shown = exr.read_plate(str(tmp_path / "b.####.exr"), [1], window="display")
    expected = np.zeros((8, 10, 3), np.float32)
    expected[3:7, 2:8] = pixels
    np.testing.assert_array_equal(shown.pixels[0], expected)


def test_read_plate_channel_order_is_rgba_whatever_the_file_order(tmp_path):
    pixels = RNG.uniform(0, 1, (8, 8, 5)).astype(np.float16)
    # EXR stores channels sorted by name ("B", "G", "N", "R"): an extra channel sits between the colours.
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    chans = {c: np.ascontiguousarray(pixels[..., i]) for i, c in zip((0, 1, 2, 4), "RGBN", strict=True)}
    OpenEXR.File(header, chans).write(str(tmp_path / "d.0001.exr"))
    plate = exr.read_plate(str(tmp_path / "d.####.exr"), [1])
    assert plate.channels == ("R", "G", "B")
    np.testing.assert_array_equal(plate.pixels[0], pixels[..., :3].astype(np.float32))


# ------------------------------------------------------------------------------------------------ errors
def _small_sequence(tmp_path, frames=(1, 2, 3), size=(8, 12)):
    for f in frames:
        _write_independent(tmp_path / f"s.{f:04d}.exr", RNG.uniform(0, 1, (*size, 4)))
    return str(tmp_path / "s.####.exr")


def test_missing_frame_is_named(tmp_path):
    pattern = _small_sequence(tmp_path, frames=(1, 2, 4))
    with pytest.raises(PlateError, match=r"missing frame\(s\) 3 .*s\.0003\.exr.*frames on disk: 1-4"):
        exr.read_plate(pattern, range(1, 5))


def test_size_change_inside_sequence_is_named(tmp_path):
    pattern = _small_sequence(tmp_path, frames=(1, 2))
    _write_independent(tmp_path / "s.0003.exr", RNG.uniform(0, 1, (10, 12, 4)))
    with pytest.raises(PlateError, match=r"s\.0003\.exr: frame 3 has data window .*same size"):
        exr.read_plate(pattern, range(1, 4), threads=1)


def test_channel_change_inside_sequence_is_named(tmp_path):
    pattern = _small_sequence(tmp_path, frames=(1, 2))
    _write_independent(tmp_path / "s.0003.exr", RNG.uniform(0, 1, (8, 12, 3)), names="RGB")
    with pytest.raises(PlateError, match=r"frame 3 has channels \['R', 'G', 'B'\]"):
        exr.read_plate(pattern, range(1, 4))


def test_unreadable_file_is_named(tmp_path):
    pattern = _small_sequence(tmp_path, frames=(1,))
    (tmp_path / "s.0002.exr").write_bytes(b"this is not an exr file at all" * 10)
    with pytest.raises(PlateError, match=r"s\.0002\.exr: not a readable image"):
        exr.read_plate(pattern, [1, 2])


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "t.0001.exr"
    _write_independent(path, RNG.uniform(0, 1, (64, 64, 4)), compression=OpenEXR.NO_COMPRESSION)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PlateError, match=r"t\.0001\.exr: .*truncated or corrupt"):
        exr.read_plate(str(tmp_path / "t.####.exr"), [1])


def test_non_rgb_channels_are_refused(tmp_path):
    OpenEXR.File({"type": OpenEXR.scanlineimage}, {"Z": np.zeros((4, 4), np.float32)}).write(
        str(tmp_path / "z.0001.exr")
    )
    with pytest.raises(PlateError, match=r"expected channels R, G, B .* found \['Z'\]"):
        exr.read_plate(str(tmp_path / "z.####.exr"), [1])


def test_empty_range_and_bad_window_are_refused(tmp_path):
    pattern = _small_sequence(tmp_path, frames=(1,))
    with pytest.raises(PlateError, match="frame range is empty"):
        exr.read_plate(pattern, [])
    with pytest.raises(PlateError, match="window='screen'"):
        exr.read_plate(pattern, [1], window="screen")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ writing
def _layers(height=10, width=14):
    comp = RNG.uniform(-1, 20, (height, width, 4)).astype(np.float32)
    edit = RNG.uniform(0, 2, (height, width, 4)).astype(np.float32)
    matte = RNG.uniform(0, 1, (height, width)).astype(np.float32)
    return comp, edit, matte


def test_layered_exr_round_trip_half_zip(tmp_path):
    comp, edit, matte = _layers()
    chroma = (0.713, 0.293, 0.165, 0.830, 0.128, 0.044, 0.32168, 0.33767)
    path = exr.write_layered_exr(
        tmp_path / "out.0001.exr",
        comp,
        edit,
        matte,
        metadata={"prompt": "add a red ball", "seed": 2**40, "steps": 4, "guidance": 5.0, "fit": {"a": [1]}},
        chromaticities=chroma,
        data_window=Window(-2, -1, 14, 10),
        display_window=Window(0, 0, 10, 8),
    )
    header, channels = _read_independent(path)
    assert sorted(channels) == sorted(["R", "G", "B", "A", "edit.R", "edit.G", "edit.B", "edit.A", "matte.A"])
    assert all(ch.dtype == np.float16 for ch in channels.values())
    assert header["compression"] == OpenEXR.ZIP_COMPRESSION
    assert header["vera/prompt"] == "add a red ball"
    assert header["vera/seed"] == str(2**40) and header["vera/steps"] == 4
    assert header["vera/guidance"] == pytest.approx(5.0) and header["vera/fit"] == '{"a": [1]}'
    np.testing.assert_allclose(header["chromaticities"], chroma, rtol=1e-6)
    assert [list(v) for v in header["dataWindow"]] == [[-2, -1], [11, 8]]
    assert [list(v) for v in header["displayWindow"]] == [[0, 0], [9, 7]]
    for i, c in enumerate("RGBA"):
        np.testing.assert_array_equal(channels[c], comp[..., i].astype(np.float16))
        np.testing.assert_array_equal(channels[f"edit.{c}"], edit[..., i].astype(np.float16))
    np.testing.assert_array_equal(channels["matte.A"], matte.astype(np.float16))
    assert sorted(os.listdir(tmp_path)) == ["out.0001.exr"]  # no temporary file left behind


def test_layered_exr_float32_is_exact(tmp_path):
    comp, edit, matte = _layers()
    path = exr.write_layered_exr(tmp_path / "f.exr", comp, edit, matte, pixel_type="float", compression="piz")
    header, channels = _read_independent(path)
    assert header["compression"] == OpenEXR.PIZ_COMPRESSION
    assert channels["R"].dtype == np.float32
    np.testing.assert_array_equal(channels["R"], comp[..., 0])
    np.testing.assert_array_equal(channels["matte.A"], matte)


def test_half_output_never_turns_a_finite_value_into_infinity(tmp_path):
    pixels = np.full((16, 16, 3), 0.5, np.float32)
    pixels[0, 0] = [1e38, -7e4, 65504.0]  # two beyond the half range, one at its edge
    pixels[1, 1] = [np.inf, -np.inf, np.nan]  # what the caller gave stays what it is
    path = exr.write_exr(tmp_path / "h.exr", pixels, ("R", "G", "B"))
    _header, channels = _read_independent(path)
    assert [float(channels[c][0, 0]) for c in "RGB"] == [65504.0, -65504.0, 65504.0]
    assert (
        np.isposinf(channels["R"][1, 1])
        and np.isneginf(channels["G"][1, 1])
        and np.isnan(channels["B"][1, 1])
    )
    assert float(channels["R"][2, 2]) == 0.5
    float_path = exr.write_exr(tmp_path / "f.exr", pixels, ("R", "G", "B"), pixel_type="float")
    assert float(_read_independent(float_path)[1]["R"][0, 0]) == pytest.approx(1e38)  # float output keeps it


def test_dwa_is_lossy_for_colour_but_never_for_the_matte(tmp_path):
    height, width = 64, 64
    comp = RNG.uniform(0, 1, (height, width, 4)).astype(np.float32)
    edit = RNG.uniform(0, 1, (height, width, 4)).astype(np.float32)
    matte = RNG.uniform(0, 1, (height, width)).astype(np.float32)
    path = exr.write_layered_exr(tmp_path / "d.exr", comp, edit, matte, compression="dwaa:200")
    header, channels = _read_independent(path)
    assert header["compression"] == OpenEXR.DWAA_COMPRESSION
    assert not np.array_equal(channels["R"], comp[..., 0].astype(np.float16))  # colour went through DCT
    np.testing.assert_array_equal(channels["matte.A"], matte.astype(np.float16))
    np.testing.assert_array_equal(channels["edit.A"], edit[..., 3].astype(np.float16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compression": "b44"}, "lossy on alpha channels"),
        ({"compression": "jpeg"}, "is not one of"),
        ({"compression": "pxr24", "pixel_type": "float"}, "rounds float32"),
        ({"compression": "piz:3"}, "only dwaa/dwab/zip"),
        ({"compression": "dwaa:high"}, "must be a number"),
        ({"pixel_type": "uint8"}, "pixel_type='uint8'"),
    ],
)
def test_bad_write_options_are_refused(tmp_path, kwargs, message):
    comp, edit, matte = _layers()
    with pytest.raises(PlateError, match=message):
        exr.write_layered_exr(tmp_path / "x.exr", comp, edit, matte, **kwargs)
    assert not any(tmp_path.iterdir())


def test_layer_shapes_are_checked(tmp_path):
    comp, edit, matte = _layers()
    with pytest.raises(PlateError, match="edit has shape"):
        exr.write_layered_exr(tmp_path / "x.exr", comp, edit[:, :5], matte)
    with pytest.raises(PlateError, match="matte has shape"):
        exr.write_layered_exr(tmp_path / "x.exr", comp, edit, matte[:5])
    with pytest.raises(PlateError, match="composite has shape"):
        exr.write_layered_exr(tmp_path / "x.exr", comp[..., :3], edit, matte)


def test_write_replaces_atomically(tmp_path):
    comp, edit, matte = _layers()
    target = tmp_path / "r.exr"
    target.write_bytes(b"old")
    exr.write_layered_exr(target, comp, edit, matte)
    assert OpenEXR.isOpenExrFile(str(target))
    assert sorted(os.listdir(tmp_path)) == ["r.exr"]


def test_write_sequence_then_read_plate_round_trip(tmp_path):
    pixels = RNG.uniform(-1, 4, (3, 6, 8, 4)).astype(np.float16).astype(np.float32)
    paths = exr.write_sequence(str(tmp_path / "w.%04d.exr"), pixels, [10, 11, 12])
    assert [p.name for p in paths] == ["w.0010.exr", "w.0011.exr", "w.0012.exr"]
    back = exr.read_plate(str(tmp_path / "w.####.exr"), range(10, 13))
    np.testing.assert_array_equal(back.pixels, pixels)
    with pytest.raises(PlateError, match="3 images but 2 frame numbers"):
        exr.write_sequence(str(tmp_path / "w.%04d.exr"), pixels, [1, 2])


# ------------------------------------------------------------------------------------------------ movies
def _write_movie(path, frames: np.ndarray, fps: int = 24) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"qscale": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def test_read_movie_decodes_display_referred_frames(tmp_path):
    frames = np.zeros((5, 32, 48, 3), np.uint8)
    for i in range(5):
        frames[i, ..., 0] = 40 + 30 * i  # flat colours survive 4:2:0 and mpeg4 nearly exactly
        frames[i, ..., 1] = 128
        frames[i, ..., 2] = 200
    path = tmp_path / "clip.mp4"
    _write_movie(path, frames)
    plate = exr.read_movie(path, colourspace="sRGB - Texture", frames=[1, 3])
    assert plate.pixels.shape == (2, 32, 48, 3) and plate.frames == [1, 3]
    assert plate.colourspace == "sRGB - Texture" and plate.channels == ("R", "G", "B")
    assert plate.pixel_type == "uint8" and not plate.has_alpha
    np.testing.assert_allclose(plate.pixels, frames[[1, 3]] / 255.0, atol=4 / 255)
    everything = exr.read_movie(path, colourspace="sRGB - Texture")
    assert everything.frames == [0, 1, 2, 3, 4]


def test_read_movie_errors(tmp_path):
    frames = np.full((2, 16, 16, 3), 100, np.uint8)
    path = tmp_path / "clip.mp4"
    _write_movie(path, frames)
    with pytest.raises(PlateError, match="declare its colour space"):
        exr.read_movie(path, colourspace="")
    with pytest.raises(PlateError, match=r"frame\(s\) 5 not in the movie, which has 2 frames"):
        exr.read_movie(path, colourspace="sRGB - Texture", frames=[0, 5])
    with pytest.raises(PlateError, match="file not found"):
        exr.read_movie(tmp_path / "nope.mov", colourspace="sRGB - Texture")
    bad = tmp_path / "bad.mov"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(PlateError, match="not a readable movie"):
        exr.read_movie(bad, colourspace="sRGB - Texture")
