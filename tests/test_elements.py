"""`vera-engine dataset from-elements`: a studio's RGBA elements over its plates, as layered tuples that pass the
format's own checks."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.released_fixtures import write_mp4
from vera_engine.imaging.colour import ColourConverter
from vera_engine.imaging.exr import write_exr
from vera_engine.tools.cli import main
from vera_engine.training.data.dataset import LayeredVideoDataset, compose_layers, iter_clips, read_index

FRAMES, SIZE = 4, (24, 32)
SWAN_LINEAR = (0.18, 0.05, 0.02)  # ACEScg, scene-linear


def _write_inputs(root):
    elements, plates = root / "elements", root / "plates"
    # A PNG element (straight alpha, sRGB): a disc with a soft edge, caption beside it.
    ball = elements / "ball"
    ball.mkdir(parents=True)
    yy, xx = np.mgrid[0:16, 0:16]
    disc = np.clip(7.5 - np.hypot(yy - 7.5, xx - 7.5), 0, 1)
    for t in range(3):  # shorter than the tuples: it loops
        rgba = np.zeros((16, 16, 4), np.uint8)
        rgba[..., 0], rgba[..., 1], rgba[..., 3] = 220, 40 + 20 * t, np.round(disc * 255)
        Image.fromarray(rgba, "RGBA").save(ball / f"ball.{t + 1:04d}.png")
    (ball / "caption.txt").write_text("a red ball\n")
    # An EXR element (premultiplied, ACEScg): an opaque block; its caption comes from --captions.
    swan = elements / "swan"
    swan.mkdir()
    block = np.zeros((12, 8, 4), np.float32)
    block[...] = (*SWAN_LINEAR, 1.0)
    for t in range(FRAMES):
        write_exr(swan / f"swan.{t + 1:04d}.exr", block, ("R", "G", "B", "A"))
    # Plates: a PNG sequence and an MP4, captions as sidecar files.
    forest = plates / "forest"
    forest.mkdir(parents=True)
    for t in range(FRAMES):
        Image.fromarray(np.full((48, 64, 3), (30, 90 + t, 40), np.uint8)).save(
            forest / f"forest.{t + 1:04d}.png"
        )
    (forest / "caption.txt").write_text("a misty forest")
    write_mp4(plates / "beach.mp4", np.full((6, 48, 64, 3), (200, 180, 120), np.uint8))
    (plates / "beach.txt").write_text("a sunny beach with gentle waves")
    captions = root / "captions.json"
    captions.write_text(json.dumps({"swan": "a white swan"}))
    return elements, plates, captions


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("elements")
    elements, plates, captions = _write_inputs(root)
    argv = ["dataset", "from-elements", "--elements", str(elements), "--plates", str(plates)]
    argv += ["--captions", str(captions), "--count", "6", "--heldout", "2", "--frames", str(FRAMES)]
    argv += ["--size", str(SIZE[0]), str(SIZE[1]), "--seed", "7", "--scale", "0.4", "0.6"]
    assert main([*argv, "--out", str(root / "a")]) == 0
    assert main([*argv, "--out", str(root / "b")]) == 0
    assert main([*argv[:-5], "--seed", "8", "--scale", "0.4", "0.6", "--out", str(root / "c")]) == 0
    return root, argv


def test_tuples_pass_the_formats_own_checks(built):
    root, _ = built
    index = read_index(root / "a")
    assert len(index["splits"]["train"]) == 6 and len(index["splits"]["heldout"]) == 2
    clips = list(iter_clips(root / "a", "train"))  # load_clip: the stored composite is Eq. 2 of the layers
    assert {c.task for c in clips} == {"object_addition", "background_change"}
    for clip in clips:
        assert clip.shape == (FRAMES, *SIZE) and clip.mask is not None
        assert np.array_equal(clip.composite, compose_layers(clip.input, clip.edit, clip.alpha))
        assert (clip.alpha > 0).any()
    dataset = LayeredVideoDataset(root / "a", "train", frames=3, size=(16, 16))
    assert tuple(dataset[0]["input"].shape) == (3, 3, 16, 16)


def test_instructions_and_layers_follow_the_paper(built):
    root, _ = built
    for clip in iter_clips(root / "a", "train"):
        if clip.task == "object_addition":
            assert clip.instruction.startswith("Add a ") and clip.instruction.endswith(".")
            # The input is the clean plate (both plates are flat colours): no trace of the element.
            assert all((frame == frame[0, 0]).all() for frame in clip.input)
            # Where the element is not, the composite is the plate.
            outside = clip.alpha == 0
            assert np.array_equal(clip.composite[outside], clip.input[outside])
        else:
            caption = clip.instruction.split("Change the background to ")[1]
            assert caption.split(". Keep ")[0] in ("a misty forest", "a sunny beach with gentle waves")
            assert clip.instruction.endswith("intact.")
            # alpha = 1 - element alpha: the kept element is where alpha is 0, the new background everywhere else.
            assert (clip.alpha == 0).any() and (clip.alpha == 1).mean() > 0.5
            kept = clip.alpha == 0
            assert np.array_equal(clip.composite[kept], clip.input[kept])


def test_exr_elements_are_converted_from_acescg_with_opencolorio(built):
    root, _ = built
    swan = [c for c in iter_clips(root / "a", "train") if c.fields["element"] == "swan"]
    assert swan, "the seed should pick the EXR element at least once"
    expected = ColourConverter("ACEScg").to_model(np.array([[SWAN_LINEAR]], np.float32))[0, 0]
    for clip in swan:
        inside = clip.alpha == 1 if clip.task == "object_addition" else clip.alpha == 0
        layer = clip.edit if clip.task == "object_addition" else clip.input
        assert np.abs(layer[inside] - expected).max() <= 1 / 255 + 1e-6
        assert clip.fields["element_colorspace"] == "ACEScg"


def test_the_same_seed_writes_the_same_dataset_and_another_seed_another(built):
    root, _ = built
    a, b, c = (list(iter_clips(root / name, "train")) for name in "abc")
    for x, y in zip(a, b, strict=True):
        assert (
            x.instruction == y.instruction
            and np.array_equal(x.edit, y.edit)
            and np.array_equal(x.alpha, y.alpha)
        )
    assert any(
        x.instruction != z.instruction or not np.array_equal(x.alpha, z.alpha)
        for x, z in zip(a, c, strict=True)
    )


def test_missing_captions_and_a_lone_plate_are_named(tmp_path, capsys):
    elements, plates, _ = _write_inputs(tmp_path)
    argv = ["dataset", "from-elements", "--elements", str(elements), "--plates", str(plates), "--count", "2"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--size", "24", "32", "--frames", "2"]) == 2
    assert "elements ['swan'] have no caption" in capsys.readouterr().err
    (plates / "beach.mp4").unlink()
    (plates / "beach.txt").unlink()
    argv += ["--captions", str(tmp_path / "captions.json"), "--size", "24", "32", "--frames", "2"]
    assert main([*argv, "--out", str(tmp_path / "p"), "--tasks", "background_change"]) == 2
    assert "background change needs a second plate" in capsys.readouterr().err


def test_the_colour_space_comes_from_the_file_or_the_flag(tmp_path):
    import OpenImageIO as oiio

    from vera_engine.training.data.elements import ColourReader

    linear = np.array([0.18, 0.05, 0.02], np.float32)
    plain, tagged = tmp_path / "plain.exr", tmp_path / "tagged.exr"
    write_exr(plain, np.broadcast_to(np.r_[linear, 1.0], (4, 4, 4)).astype(np.float32), ("R", "G", "B", "A"))
    spec = oiio.ImageSpec(4, 4, 4, oiio.FLOAT)
    spec.channelnames = ("R", "G", "B", "A")
    spec.attribute("oiio:ColorSpace", "Linear Rec.709 (sRGB)")
    out = oiio.ImageOutput.create(str(tagged))
    out.open(str(tagged), spec)
    out.write_image(np.broadcast_to(np.r_[linear, 1.0], (4, 4, 4)).astype(np.float32).copy())
    out.close()

    def model(space):
        return ColourConverter(space).to_model(linear[None, None])[0, 0]

    reader = ColourReader(None, None)
    pixels, space = reader.read(plain, "element")  # no colour space in the header: ACEScg
    assert space == "ACEScg" and np.allclose(pixels[0, 0, :3], model("ACEScg"), atol=2e-3)
    pixels, space = reader.read(tagged, "element")  # the header's
    assert space == "Linear Rec.709 (sRGB)" and np.allclose(
        pixels[0, 0, :3], model("Linear Rec.709 (sRGB)"), atol=1e-6
    )
    assert np.abs(model("ACEScg") - model("Linear Rec.709 (sRGB)")).max() > 0.02  # the spaces differ
    pixels, space = ColourReader("ACEScg", None).read(tagged, "element")  # the flag wins
    assert space == "ACEScg" and np.allclose(pixels[0, 0, :3], model("ACEScg"), atol=2e-3)
