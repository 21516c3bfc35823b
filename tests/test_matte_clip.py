"""The matte's clip black / clip white (issue 22): in the schema every host builds its form from, checked at Submit,
applied to the model's matte before the layers are made, and recorded in the results."""

import numpy as np
import pytest

from tests.service_helpers import read_exr_all, vera_edit_args
from vera_engine.pipelines.presets import build_random_pipeline
from vera_engine.service.errors import InputError
from vera_engine.service.runner import PipelineRunner
from vera_engine.service.schema import ModelDefaults, model_info, resolve_header
from vera_plugin import cli
from vera_proto.vera.v1 import engine_pb2 as pb

pytestmark = pytest.mark.timeout(300)


def test_the_schema_offers_clip_black_and_white_and_fills_the_defaults():
    info = model_info(ModelDefaults("m", 32, 32, 4), ["ACEScg"], ["zip"])
    black = next(o for o in info.options if o.name == "clip_black")
    white = next(o for o in info.options if o.name == "clip_white")
    assert black.type == white.type == pb.OPTION_TYPE_FLOAT
    assert black.default.float_value == pytest.approx(0.05) and white.default.float_value == pytest.approx(
        0.95
    )
    header = resolve_header(pb.JobHeader(prompt="x", frames=[1]), [info])
    assert header.clip_black == pytest.approx(0.05) and header.clip_white == pytest.approx(0.95)
    header = resolve_header(pb.JobHeader(prompt="x", frames=[1], clip_black=0.0, clip_white=1.0), [info])
    assert (header.clip_black, header.clip_white) == (0.0, 1.0)
    with pytest.raises(InputError, match=r"header\.clip_black: 0\.5 is not below clip_white 0\.5"):
        resolve_header(pb.JobHeader(prompt="x", frames=[1], clip_black=0.5, clip_white=0.5), [info])
    with pytest.raises(InputError, match=r"header\.clip_black"):
        resolve_header(pb.JobHeader(prompt="x", frames=[1], clip_black=0.7), [info])


def test_every_host_form_offers_the_clip_options():
    from vera_plugin import schema_ui

    # The Nuke node, the Resolve window and the panel build their fields with schema_ui (tests/test_nuke.py,
    # tests/test_panel.py check that): the two fields are there, and a filled form gives the header's values.
    info = model_info(ModelDefaults("m", 32, 32, 4), ["ACEScg"], ["zip"])
    fields = schema_ui.fields_for_model(info)
    assert {"clip_black", "clip_white"} <= {field.name for field in fields}
    _, options = schema_ui.job_options(fields, {"prompt": "add a ball", "clip_black": 0.1}, "ACEScg")
    assert options["clip_black"] == pytest.approx(0.1) and options["clip_white"] == pytest.approx(0.95)
    with pytest.raises(schema_ui.OptionsError, match="clip_white"):
        schema_ui.job_options(fields, {"prompt": "add a ball", "clip_white": 0.2}, "ACEScg")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("matte_clip")
    build_random_pipeline("tiny", seed=5).save_pretrained(root / "m", safe_serialization=True)
    return root / "m"


def test_vera_edit_clip_black_zeroes_the_faint_matte_and_keeps_the_plate_there(model_dir, tmp_path, capsys):
    with vera_edit_args(PipelineRunner(str(model_dir), device="cpu"), tmp_path) as common:
        results = {}
        for label, extra in {
            "off": ["--clip-black", "0", "--clip-white", "1"],
            "hard": ["--clip-black", "0.45", "--clip-white", "0.55"],
        }.items():
            out = tmp_path / label
            assert cli.main(["edit", *common, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
            results[label] = read_exr_all(out / "vera_edit.0001.exr")
        assert cli.main(["edit", *common, "--clip-black", "0.9", "--out", str(tmp_path / "bad")]) != 0
        assert "header.clip_black" in capsys.readouterr().err
    channels = {label: dict(zip(r[1], np.moveaxis(r[0], -1, 0), strict=True)) for label, r in results.items()}
    matte_key = next(k for k in channels["off"] if k.lower().endswith("matte.a") or k.lower() == "matte.y")
    off, hard = channels["off"][matte_key], channels["hard"][matte_key]
    # A random model's matte is mid-grey noise: clipped hard at model resolution, far more of it is exactly 0 or 1
    # at plate resolution (the upsampling keeps the clipped regions' interiors exact).
    assert np.mean((hard == 0) | (hard == 1)) > np.mean((off == 0) | (off == 1)) + 0.1
    metadata = {a.name: a.value for a in results["hard"][2].extra_attribs}
    assert any(k.endswith("matte_clip") and v == "black 0.45, white 0.55" for k, v in metadata.items()), (
        metadata
    )
