"""vera_plugin.hosts.resolve.timeline: the timecode, frame-range, path and render arithmetic of the Resolve adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from vera_plugin.hosts.resolve.timeline import (
    ClipRange,
    SequencePath,
    append_clip_info,
    choose_exr_codec,
    choose_exr_format,
    frame_to_timecode,
    import_clip_info,
    item_at_frame,
    numbered_files,
    parse_frame_rate,
    parse_resolution,
    parse_sequence_path,
    render_settings,
    sequence_from_files,
    timecode_to_frame,
)


def test_frame_rates() -> None:
    assert parse_frame_rate("24") == (24.0, False)
    assert parse_frame_rate("23.976") == (23.976, False)
    assert parse_frame_rate("29.97 DF") == (29.97, True)
    assert parse_frame_rate(25) == (25.0, False)
    for bad in ("", "fast", "0", "-24"):
        with pytest.raises(ValueError, match="frame rate"):
            parse_frame_rate(bad)


def test_non_drop_timecode() -> None:
    assert timecode_to_frame("01:00:00:00", 24) == 86400
    assert timecode_to_frame("01:00:04:12", 24) == 86400 + 4 * 24 + 12
    assert timecode_to_frame("00:00:41:17", 24) == 1001
    assert timecode_to_frame("01:00:00:00", 23.976) == 86400  # NDF counts nominal frames
    assert frame_to_timecode(86400 + 109, 24) == "01:00:04:13"
    assert frame_to_timecode(1001, 24) == "00:00:41:17"
    for frame in (0, 1, 23, 24, 1439, 1440, 86399, 86400, 123456):
        assert timecode_to_frame(frame_to_timecode(frame, 25), 25) == frame
    with pytest.raises(ValueError, match="out of range"):
        timecode_to_frame("01:00:00:24", 24)
    with pytest.raises(ValueError, match="HH:MM:SS:FF"):
        timecode_to_frame("1h", 24)
    with pytest.raises(ValueError, match="negative"):
        frame_to_timecode(-1, 24)


def test_drop_frame_timecode() -> None:
    # SMPTE 29.97 DF: frames 0 and 1 are skipped at each minute except every tenth.
    assert timecode_to_frame("00:01:00;02", 29.97) == 1800
    assert timecode_to_frame("00:00:59;29", 29.97) == 1799
    assert timecode_to_frame("00:10:00;00", 29.97) == 17982
    assert timecode_to_frame("01:00:00;00", 29.97) == 107892
    assert frame_to_timecode(1800, 29.97, drop_frame=True) == "00:01:00;02"
    assert frame_to_timecode(17982, 29.97, drop_frame=True) == "00:10:00;00"
    for frame in range(0, 40000, 7):
        assert timecode_to_frame(frame_to_timecode(frame, 29.97, True), 29.97) == frame
    for frame in range(0, 40000, 11):
        assert timecode_to_frame(frame_to_timecode(frame, 59.94, True), 59.94) == frame
    assert timecode_to_frame("00:01:00;04", 59.94) == 3600
    with pytest.raises(ValueError, match="does not exist in drop-frame"):
        timecode_to_frame("00:01:00;01", 29.97)
    with pytest.raises(ValueError, match=r"only at 29\.97 and 59\.94"):
        timecode_to_frame("00:01:00;05", 25)
    # The separator decides unless told otherwise.
    assert timecode_to_frame("00:01:00:02", 29.97) == 1802
    assert timecode_to_frame("00:01:00:02", 29.97, drop_frame=True) == 1800


def test_sequence_paths() -> None:
    seq = parse_sequence_path("/shots/sh010/plate.[1001-1100].exr")
    assert seq == SequencePath("/shots/sh010/plate.%04d.exr", 1001, 1100)
    assert seq.extension == "exr" and seq.path(1002) == "/shots/sh010/plate.1002.exr"
    with pytest.raises(ValueError, match="outside the sequence"):
        seq.path(1101)
    assert parse_sequence_path("/shots/a_[001-010].dpx") == SequencePath("/shots/a_%03d.dpx", 1, 10)
    assert parse_sequence_path("/shots/100%_[1-3].exr").path(2) == "/shots/100%_2.exr"
    assert parse_sequence_path("/shots/clip.mov") is None
    assert parse_sequence_path("/shots/v[2]/clip.mov") is None  # brackets in a folder are not frames
    with pytest.raises(ValueError, match="ends before it starts"):
        parse_sequence_path("/s/p.[10-1].exr")


def test_sequence_from_files_and_numbered_files(tmp_path: Path) -> None:
    files = [tmp_path / f"vera_edit.{f:04d}.exr" for f in (1001, 1002, 1003)]
    assert sequence_from_files(files) == SequencePath(str(tmp_path / "vera_edit.%04d.exr"), 1001, 1003)
    wide = [tmp_path / f"vera_edit.{f:04d}.exr" for f in (9999, 10000)]
    assert sequence_from_files(wide).pattern % 10000 == str(wide[1])
    with pytest.raises(ValueError, match="gaps"):
        sequence_from_files(files[:1] + files[2:])
    with pytest.raises(ValueError, match="more than one sequence"):
        sequence_from_files([files[0], tmp_path / "other.1002.exr"])
    with pytest.raises(ValueError, match="no frame number"):
        sequence_from_files([tmp_path / "plate.exr"])
    with pytest.raises(ValueError, match="padded inconsistently"):
        sequence_from_files([tmp_path / "a.0009.exr", tmp_path / "a.010.exr"])
    with pytest.raises(ValueError, match="no files"):
        sequence_from_files([])
    for name in ("src_00086410.exr", "src_00086402.exr", "src_00086409.exr", "notes.txt", "x.EXR"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in numbered_files(tmp_path, "exr")] == [
        "src_00086402.exr",
        "src_00086409.exr",
        "src_00086410.exr",
    ]


def test_clip_range_and_item_lookup() -> None:
    clip = ClipRange(record_start=86448, record_end=86451, left_offset=5)
    assert clip.duration == 3
    assert clip.record_frames == [86448, 86449, 86450]
    assert clip.source_frames(1001) == [1006, 1007, 1008]
    with pytest.raises(ValueError, match="at or before it starts"):
        ClipRange(10, 10, 0)
    with pytest.raises(ValueError, match="negative"):
        ClipRange(10, 12, -1)
    spans = [(0, 10), (10, 20), (25, 30)]
    assert [item_at_frame(spans, f) for f in (0, 9, 10, 19, 20, 24, 25, 30)] == [
        0,
        0,
        1,
        1,
        None,
        None,
        2,
        None,
    ]


def test_clip_infos_and_render_settings(tmp_path: Path) -> None:
    assert append_clip_info("mpi", 1003, 3, 4, 86448) == {
        "mediaPoolItem": "mpi",
        "startFrame": 1003,  # the media's own frame numbers
        "endFrame": 1006,  # exclusive
        "mediaType": 1,
        "trackIndex": 4,
        "recordFrame": 86448,
    }
    assert append_clip_info("mpi", 1003, 3, 4, 86448, end_inclusive=True)["endFrame"] == 1005
    with pytest.raises(ValueError, match="at least one frame"):
        append_clip_info("mpi", 0, 0, 1, 0)
    with pytest.raises(ValueError, match="start at 1"):
        append_clip_info("mpi", 0, 1, 0, 0)
    seq = SequencePath("/r/vera_edit.%04d.exr", 1001, 1003)
    assert import_clip_info(seq) == {
        "FilePath": "/r/vera_edit.%04d.exr",
        "StartIndex": 1001,
        "EndIndex": 1003,
    }
    settings = render_settings(86448, 86451, tmp_path, "src", (1920, 1080))
    assert settings["MarkIn"] == 86448 and settings["MarkOut"] == 86450  # inclusive
    assert settings["TargetDir"] == str(tmp_path) and settings["ExportAudio"] is False
    assert (settings["FormatWidth"], settings["FormatHeight"]) == (1920, 1080)
    assert "FormatWidth" not in render_settings(0, 1, tmp_path, "src")
    with pytest.raises(ValueError, match="empty"):
        render_settings(5, 5, tmp_path, "src")
    assert parse_resolution("1920x1080") == (1920, 1080)
    assert parse_resolution("") is None and parse_resolution("HD") is None


def test_exr_format_and_codec_are_chosen_from_what_resolve_offers() -> None:
    # GetRenderFormats maps display name -> extension; GetRenderCodecs/SetCurrentRenderFormatAndCodec take the latter.
    assert choose_exr_format({"QuickTime": "mov", "OpenEXR": "exr"}) == ("OpenEXR", "exr")
    assert choose_exr_format({"EXR": ".EXR"}) == ("EXR", "EXR")
    with pytest.raises(ValueError, match="no EXR render format"):
        choose_exr_format({"QuickTime": "mov"})
    codecs = {
        "RGB Half (DWAA)": "RGBHalfDWAA",
        "RGB Float (No compression)": "RGBFloat",
        "RGB Half (PIZ)": "RGBHalfPIZ",
        "RGB Half (ZIP)": "RGBHalfZIP",
    }
    assert choose_exr_codec(codecs) == ("RGB Half (ZIP)", "RGBHalfZIP")
    del codecs["RGB Half (ZIP)"]
    assert choose_exr_codec(codecs) == ("RGB Half (PIZ)", "RGBHalfPIZ")
    assert choose_exr_codec({"RGB Float (No compression)": "RGBFloat", "RGB Half (B44)": "b44"}) == (
        "RGB Float (No compression)",
        "RGBFloat",
    )
    with pytest.raises(ValueError, match="no lossless EXR codec"):
        choose_exr_codec({"RGB Half (DWAB)": "dwab", "RGB Half (B44A)": "b44a"})
