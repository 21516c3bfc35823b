"""`serve --lora NAME=PATH`: the schema offers the adapters, `vera edit --lora` uses one, off is the base model."""

import numpy as np
import pytest
import torch

from tests.service_helpers import read_exr_all, vera_edit_args
from vera_engine.pipelines.presets import build_random_pipeline
from vera_engine.service.runner import PipelineRunner
from vera_engine.service.schema import ModelDefaults, model_info, resolve_header
from vera_engine.service.spool import InputError
from vera_engine.training.lora import add_training_adapter, base_transformer_hash, save_adapter
from vera_plugin import cli
from vera_proto.vera.v1 import engine_pb2 as pb

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base model and an adapter for it (random, non-zero B: it changes what the model does)."""
    root = tmp_path_factory.mktemp("serve_lora")
    base = root / "base"
    pipe = build_random_pipeline("tiny", seed=5)
    pipe.save_pretrained(base, safe_serialization=True)
    model = pipe.transformer
    add_training_adapter(model, 2)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapter = save_adapter(model, root / "adapter", base_hash=base_transformer_hash(base), base_name="base")
    return base, adapter


def test_the_schema_offers_served_adapters_and_checks_a_header():
    info = model_info(ModelDefaults("m", 32, 32, 4, loras=("swans", "forest")), ["ACEScg"], ["zip"])
    lora = next(o for o in info.options if o.name == "lora")
    assert list(lora.choices) == ["none", "swans", "forest"] and lora.default.string_value == "none"
    scale = next(o for o in info.options if o.name == "lora_scale")
    assert scale.default.float_value == 1.0 and scale.max == 2.0
    header = resolve_header(pb.JobHeader(prompt="x", frames=[1]), [info])
    assert header.lora == "none" and header.lora_scale == 1.0
    assert (
        resolve_header(pb.JobHeader(prompt="x", frames=[1], lora="swans", lora_scale=0.5), [info]).lora_scale
        == 0.5
    )
    with pytest.raises(InputError, match=r"header\.lora"):
        resolve_header(pb.JobHeader(prompt="x", frames=[1], lora="boats"), [info])
    with pytest.raises(InputError, match=r"header\.lora_scale"):
        resolve_header(pb.JobHeader(prompt="x", frames=[1], lora="swans", lora_scale=3.0), [info])
    plain = model_info(ModelDefaults("m", 32, 32, 4), ["ACEScg"], ["zip"])
    assert not any(o.name.startswith("lora") for o in plain.options)  # no adapters, no options for them
    with pytest.raises(InputError, match="serves no adapters"):
        resolve_header(pb.JobHeader(prompt="x", frames=[1], lora="swans"), [plain])


def test_vera_edit_lora_uses_the_served_adapter_and_none_is_the_base_model(models, tmp_path, capsys):
    base, adapter = models
    with vera_edit_args(
        PipelineRunner(str(base), device="cpu", loras={"tuned": str(adapter)}), tmp_path
    ) as common:
        results = {}
        for label, extra in {
            "default": [],
            "none": ["--lora", "none"],
            "tuned": ["--lora", "tuned"],
            "half": ["--lora", "tuned", "--lora-scale", "0.5"],
        }.items():
            out = tmp_path / label
            assert cli.main(["edit", *common, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
            results[label] = read_exr_all(out / "vera_edit.0001.exr")
        assert cli.main(["edit", *common, "--lora", "boats", "--out", str(tmp_path / "bad")]) != 0
        assert "header.lora" in capsys.readouterr().err
    pixels = {label: r[0] for label, r in results.items()}
    assert np.array_equal(pixels["none"], pixels["default"])  # no adapter: the base model, bit for bit
    assert np.abs(pixels["tuned"] - pixels["default"]).max() > 1e-3
    assert not np.array_equal(pixels["half"], pixels["tuned"])
    # The result says which adapter made it.
    metadata = {attrib.name: attrib.value for attrib in results["half"][2].extra_attribs}
    assert any(k.endswith("lora") and v == "tuned x0.5" for k, v in metadata.items()), metadata


def test_serve_refuses_an_adapter_for_another_model(models, tmp_path):
    _, adapter = models
    other = tmp_path / "other"
    build_random_pipeline("tiny", seed=6).save_pretrained(other, safe_serialization=True)
    with pytest.raises(ValueError, match=r"was trained on base \(transformer sha256 \w{12}\), not on other"):
        PipelineRunner(str(other), device="cpu", loras={"tuned": str(adapter)})


def test_every_host_form_offers_the_adapters_from_the_schema():
    # The Nuke node, the Resolve window and the panel all build their fields with schema_ui (tests/test_nuke.py,
    # tests/test_panel.py check that): a model that serves adapters gets the two fields, and a filled form gives
    # the header's lora / lora_scale.
    from vera_plugin import schema_ui

    info = model_info(ModelDefaults("m", 32, 32, 4, loras=("swans",)), ["ACEScg"], ["zip"])
    fields = {f.name: f for f in schema_ui.fields_for_model(info)}
    assert fields["lora"].kind == "choice" and fields["lora"].choices == ("none", "swans")
    assert fields["lora"].default == "none"
    assert fields["lora_scale"].kind == "float" and (
        fields["lora_scale"].minimum,
        fields["lora_scale"].maximum,
    ) == (
        0.0,
        2.0,
    )
    _, options = schema_ui.job_options(
        list(fields.values()),
        {"prompt": "add a swan", "lora": "swans", "lora_scale": 0.7, "colorspace": "ACEScg"},
    )
    assert options["lora"] == "swans" and options["lora_scale"] == pytest.approx(0.7)
    header = pb.JobHeader(prompt="add a swan", frames=[1], **{k: options[k] for k in ("lora", "lora_scale")})
    assert resolve_header(header, [info]).lora == "swans"
    with pytest.raises(schema_ui.OptionsError):
        schema_ui.job_options(list(fields.values()), {"prompt": "x", "lora": "boats", "colorspace": "ACEScg"})
