"""Display-space previews: contact sheet PNG and MP4."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from vera_engine.imaging.colour import ColourConverter
from vera_engine.imaging.composite import composite_over_plate, premultiply
from vera_engine.imaging.preview import (
    checkerboard,
    contact_sheet,
    preview_frames,
    write_contact_sheet,
    write_preview_mp4,
)

F, H, W = 3, 40, 64


@pytest.fixture(scope="module")
def layers():
    rng = np.random.default_rng(8)
    plate = rng.uniform(0.0, 2.0, (F, H, W, 3)).astype(np.float32)
    matte = np.zeros((F, H, W), np.float32)
    matte[:, 10:30, 20:44] = 1.0
    edit = premultiply(np.broadcast_to(np.array([4.0, 0.2, 0.1], np.float32), (F, H, W, 3)), matte)
    comp = composite_over_plate(plate, edit, matte)
    return plate, edit, matte, comp


@pytest.fixture(scope="module")
def conv():
    return ColourConverter("ACEScg")


def test_preview_frames_lay_out_four_display_panels(layers, conv):
    plate, edit, matte, comp = layers
    out = preview_frames(plate, edit, matte, comp, colour=conv, panel_height=H)
    gap = 4
    assert out.shape == (F, H, 4 * W + 3 * gap, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0
    panels = [out[:, :, i * (W + gap) : i * (W + gap) + W] for i in range(4)]
    np.testing.assert_allclose(panels[0], conv.to_display(plate), atol=1e-5)
    np.testing.assert_allclose(panels[3], conv.to_display(comp[..., :3]), atol=1e-5)
    np.testing.assert_allclose(panels[2][..., 0], matte, atol=1e-6)
    # Edit panel: checkerboard where the matte is empty, the layer's display colour where it is opaque.
    board = checkerboard(H, W)
    empty = matte[0] == 0
    np.testing.assert_allclose(panels[1][0][empty], board[empty], atol=1e-6)
    red = conv.to_display(np.array([[4.0, 0.2, 0.1]], np.float32))[0]
    np.testing.assert_allclose(panels[1][0, 20, 30], red, atol=1e-5)


def test_contact_sheet_png(layers, conv, tmp_path):
    plate, edit, matte, comp = layers
    sheet = contact_sheet(plate, edit, matte, comp, colour=conv, panel_height=20)
    # First, middle and last frames as rows; panels downscaled to 20 px high (even sizes).
    assert sheet.shape == (3 * 20 + 2 * 4, 4 * 32 + 3 * 4, 3)
    path = write_contact_sheet(tmp_path / "sheet.png", sheet)
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (sheet.shape[1], sheet.shape[0])
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels, np.round(sheet * 255).astype(np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 2\]"):
        contact_sheet(plate, edit, matte, comp, colour=conv, frames=[5])


def test_preview_mp4_decodes(layers, conv, tmp_path):
    plate, edit, matte, comp = layers
    frames = preview_frames(plate, edit, matte, comp, colour=conv, panel_height=32)
    path = write_preview_mp4(tmp_path / "preview.mp4", frames, fps=12)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == pytest.approx(12.0)
    assert len(decoded) == F
    assert decoded[0].shape == (frames.shape[1], frames.shape[2] // 2 * 2, 3)
    # Lossy (and the plate panels are noise), but the flat matte panel comes through within a few codes.
    panel_width = (frames.shape[2] - 3 * 4) // 4
    matte_panel = (slice(None), slice(2 * (panel_width + 4), 3 * panel_width + 2 * 4))
    error = np.abs(decoded[1].astype(np.float32) / 255 - frames[1, :, : decoded[1].shape[1]])
    assert error[matte_panel].mean() < 0.03
    assert [p.name for p in tmp_path.iterdir()] == ["preview.mp4"]


def test_preview_input_errors(layers, conv, tmp_path):
    plate, edit, matte, comp = layers
    with pytest.raises(ValueError, match="source has shape"):
        preview_frames(plate[:, :10], edit, matte, comp, colour=conv)
    with pytest.raises(ValueError, match="edit_premult has shape"):
        preview_frames(plate, edit[..., :3], matte, comp, colour=conv)
    with pytest.raises(ValueError, match=r"expected \(F, H, W, 3\)"):
        write_preview_mp4(tmp_path / "x.mp4", np.zeros((2, 8, 8), np.float32))
