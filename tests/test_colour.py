"""Colour conversions with OpenColorIO against published values."""

from __future__ import annotations

import numpy as np
import PyOpenColorIO as ocio
import pytest

from vera_engine.imaging import colour
from vera_engine.imaging.colour import BUILTIN_CONFIG, ColourConverter

# AP1 (ACEScg) -> linear Rec.709 with Bradford D60 -> D65, as published by ACES / colour-science.
AP1_TO_REC709 = np.array(
    [[1.70505, -0.62179, -0.08326], [-0.13026, 1.14080, -0.01055], [-0.02400, -0.12897, 1.15297]], np.float32
)


def _srgb_encode(x: np.ndarray) -> np.ndarray:
    """The IEC 61966-2-1 sRGB encoding, written out independently of OCIO."""
    x = np.asarray(x, np.float64)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(np.maximum(x, 0), 1 / 2.4) - 0.055)


def _srgb_decode(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


@pytest.fixture(autouse=True)
def _no_ocio_env(monkeypatch):
    monkeypatch.delenv("OCIO", raising=False)


def test_builtin_config_is_pinned_and_versioned():
    names = [entry[0] for entry in ocio.BuiltinConfigRegistry().getBuiltinConfigs()]
    assert BUILTIN_CONFIG.removeprefix("ocio://") in names
    assert "default" not in BUILTIN_CONFIG
    config = colour.load_config()
    assert config.getColorSpace("ACEScg") is not None


def test_ocio_environment_variable_is_honoured(tmp_path, monkeypatch):
    config = ocio.Config.CreateFromFile(BUILTIN_CONFIG)
    config.setName("studio-from-env")
    path = tmp_path / "config.ocio"
    path.write_text(config.serialize())
    monkeypatch.setenv("OCIO", str(path))
    assert colour.load_config().getName() == "studio-from-env"
    monkeypatch.setenv("OCIO", str(tmp_path / "missing.ocio"))
    with pytest.raises(ValueError, match=r"missing\.ocio.*does not exist"):
        colour.load_config()


def test_mid_grey_to_model_space():
    conv = ColourConverter("ACEScg")
    out = conv.to_model(np.full((1, 1, 3), 0.18, np.float32))
    # Neutral stays neutral through the white-point adaptation; sRGB-encoded 0.18 is 0.4614.
    np.testing.assert_allclose(out, _srgb_encode(0.18), atol=2e-4)
    assert out[0, 0, 0] == pytest.approx(0.4614, abs=2e-4)


def test_acescg_primaries_to_linear_rec709_match_published_matrix():
    conv = ColourConverter("ACEScg")
    primaries = np.eye(3, dtype=np.float32)
    out = conv.convert(primaries, "ACEScg", "Linear Rec.709 (sRGB)")
    np.testing.assert_allclose(out, AP1_TO_REC709.T, atol=2e-4)


def test_srgb_primaries_through_acescg_round_trip():
    conv = ColourConverter("lin_ap1")  # an alias
    rec709 = np.eye(3, dtype=np.float32)
    ap1 = conv.convert(rec709, "lin_srgb", "ACEScg")
    # Rec.709 red in AP1 (published: 0.6131, 0.0702, 0.0206).
    np.testing.assert_allclose(ap1[0], [0.6131, 0.0702, 0.0206], atol=2e-4)
    np.testing.assert_allclose(conv.convert(ap1, "ACEScg", "Linear Rec.709 (sRGB)"), rec709, atol=1e-5)
    # And sRGB-encoded primaries come back as exactly (1, 0, 0) etc. from the model space.
    np.testing.assert_allclose(conv.to_model(conv.from_model(rec709)), rec709, atol=1e-5)


def test_model_space_clamps_and_round_trips_in_gamut():
    conv = ColourConverter("ACEScg")
    rng = np.random.default_rng(0)
    model = rng.uniform(0, 1, (4, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(conv.to_model(conv.from_model(model)), model, atol=2e-5)
    out = conv.to_model(np.array([[[8.0, -1.0, 0.5]]], np.float32))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out[0, 0, 0] == 1.0 and out[0, 0, 1] == 0.0


def test_alpha_is_never_transformed():
    conv = ColourConverter("ACEScg", hdr=True)
    rgba = np.array([[[0.18, 0.5, 2.0, 0.3], [4.0, 4.0, 4.0, 0.0]]], np.float32)
    for out in (conv.to_model(rgba), conv.from_model(np.clip(rgba, 0, 1)), conv.to_display(rgba)):
        assert out.shape == rgba.shape
        np.testing.assert_array_equal(out[..., 3], rgba[..., 3])
    with pytest.raises(ValueError, match="expected RGB or RGBA"):
        conv.to_model(np.zeros((2, 2, 2), np.float32))


def test_hdr_option_keeps_highlights_through_the_sdr_view():
    plain = ColourConverter("ACEScg")
    hdr = ColourConverter("ACEScg", hdr=True)
    highlights = np.array([[[4.0, 4.0, 4.0], [2.0, 1.0, 0.5], [0.18, 0.18, 0.18]]], np.float32)
    assert np.all(plain.to_model(highlights)[0, 0] == 1.0)  # clamped: lost
    model = hdr.to_model(highlights)
    assert model.max() <= 1.0 and model[0, 0, 0] < 1.0  # rolled off below display white
    # The inverse view transform brings the highlights back.
    np.testing.assert_allclose(hdr.from_model(model), highlights, rtol=2e-2, atol=1e-3)
    # The ACES 1.0 SDR output transform puts scene mid grey at about 10% of display white.
    assert float(_srgb_decode(model[0, 2, 0])) == pytest.approx(0.10, abs=0.01)


def test_unknown_colour_space_names_the_input_and_suggests():
    with pytest.raises(ValueError, match=r"working colour space 'ACEScgg' .*did you mean 'ACEScg'"):
        ColourConverter("ACEScgg")
    conv = ColourConverter()
    with pytest.raises(ValueError, match="destination colour space 'nope'"):
        conv.convert(np.zeros((1, 1, 3), np.float32), "ACEScg", "nope")


def test_roles_and_aliases_resolve_to_canonical_names():
    assert ColourConverter("scene_linear").working_space == "ACEScg"
    assert ColourConverter("lin_rec709").working_space == "Linear Rec.709 (sRGB)"


def test_chromaticities_of_working_spaces():
    assert ColourConverter("ACEScg").chromaticities() == pytest.approx(
        (0.713, 0.293, 0.165, 0.830, 0.128, 0.044, 0.32168, 0.33767)
    )
    assert colour.chromaticities("lin_srgb")[:2] == (0.64, 0.33)
    assert colour.chromaticities("ARRI LogC4") is None


def test_movie_colourspace_to_working():
    conv = ColourConverter("ACEScg")
    code = np.array([[[_srgb_encode(0.18)] * 3]], np.float32)
    np.testing.assert_allclose(conv.to_working(code, "sRGB - Texture"), 0.18, atol=2e-4)


def test_display_view_options():
    with pytest.raises(ValueError, match="hdr=True needs display 'Nope'"):
        ColourConverter("ACEScg", hdr=True, display="Nope")
    # Without a usable view, previews fall back to the model space.
    plain = ColourConverter("ACEScg", view="Not a view")
    grey = np.full((1, 1, 3), 0.18, np.float32)
    np.testing.assert_allclose(plain.to_display(grey), plain.to_model(grey))
    un_tone_mapped = ColourConverter("ACEScg", hdr=True, view="Un-tone-mapped")
    np.testing.assert_allclose(un_tone_mapped.to_model(grey), _srgb_encode(0.18), atol=1e-3)
    with pytest.raises(ValueError, match="model colour space 'Video'"):
        ColourConverter("ACEScg", model_space="Video")


def test_the_engine_offers_display_referred_video_spaces_for_rendered_clips():
    # Resolve renders a clip in the project's output space (Rec.709 Gamma 2.4 in a default SDR project): the engine
    # publishes the config's sdr-video spaces after the scene-linear ones, so the Resolve window can declare the
    # rendered clip as what it is (issue 25 item 3), and a plate in such a space goes to the model and back exactly.
    from vera_engine.imaging.colour import DEFAULT_WORKING_SPACE, ColourConverter
    from vera_engine.service.runner import plate_colour_spaces

    spaces = plate_colour_spaces()
    assert spaces[0] == DEFAULT_WORKING_SPACE
    assert "Gamma 2.4 Rec.709 - Texture" in spaces and "Linear Rec.709 (sRGB)" in spaces
    assert spaces.index("Gamma 2.4 Rec.709 - Texture") > spaces.index("Linear Rec.709 (sRGB)")
    video = ColourConverter("Gamma 2.4 Rec.709 - Texture")
    ramp = np.linspace(0.0, 1.0, 33, dtype=np.float32)
    rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 0.25)], axis=-1)[None]
    np.testing.assert_allclose(video.from_model(video.to_model(rgb)), rgb, atol=2e-4)
