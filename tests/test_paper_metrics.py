"""The paper's scores (Table 1 preservation, matte IoU / MAD) against values worked out by hand, and `eval` on the
released layout."""

import json

import numpy as np
import pytest

from tests.released_fixtures import write_released_dataset
from tests.wan_fixtures import save_tiny_wan_pipeline
from vera_engine.tools.cli import main
from vera_engine.training.data.dataset import LayeredClip, compose_layers
from vera_engine.training.paper_metrics import lpips_status, matte_scores, score_clip

F, H, W = 2, 16, 16


def _clip(task: str) -> LayeredClip:
    source = np.full((F, H, W, 3), 0.5, np.float32)
    subject = np.zeros((F, H, W), np.float32)
    subject[:, 4:8, 4:8] = 1.0
    # Background change: the new background is everywhere but the kept subject (alpha = 1 - subject).
    alpha = (1.0 - subject) if task == "background_change" else subject
    edit = np.full((F, H, W, 3), 0.2, np.float32)
    return LayeredClip(
        input=source,
        edit=edit,
        alpha=alpha,
        composite=compose_layers(source, edit, alpha),
        instruction="x",
        task=task,
    )


def test_object_addition_preservation_is_scored_over_the_whole_frame():
    clip = _clip("object_addition")
    composite = clip.input + np.float32(0.1)  # every sample 0.1 off the source: MSE 0.01
    scores = score_clip(clip, {"composite": composite, "alpha": clip.alpha}, lpips=False)
    assert scores["psnr"] == pytest.approx(20.0, abs=1e-5)  # 10 log10(1 / 0.01)
    # Two flat images a = 0.5, b = 0.6: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 1)^2 (contrast terms 1).
    c1 = 1e-4
    assert scores["ssim"] == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1), abs=1e-6)
    assert scores["matte_iou"] == 1.0 and scores["matte_mad"] == 0.0


def test_background_change_preservation_is_scored_over_the_kept_subject_only():
    clip = _clip("background_change")
    composite = np.full((F, H, W, 3), 0.9, np.float32)  # a new background...
    composite[:, 4:8, 4:8] = 0.5 + 0.1  # ...and the subject 0.1 off the source
    scores = score_clip(clip, {"composite": composite, "alpha": clip.alpha}, lpips=False)
    assert scores["psnr"] == pytest.approx(20.0, abs=1e-5)  # only the 4x4 subject counts
    # Identical where it counts: the cap, and an SSIM of 1 over a subject larger than nothing.
    exact = np.where(clip.alpha[..., None] == 0, clip.input, composite)
    perfect = score_clip(clip, {"composite": exact, "alpha": clip.alpha}, lpips=False)
    assert perfect["psnr"] == 100.0


def test_matte_iou_and_mad_by_hand():
    truth = np.zeros((1, 8, 8), np.float32)
    truth[0, 0:4, 2:6] = 1.0
    predicted = np.zeros((1, 8, 8), np.float32)
    predicted[0, 0:4, 0:4] = 1.0
    scores = matte_scores(predicted, truth)
    assert scores["matte_iou"] == pytest.approx(8 / 24)  # overlap 4x2, union 4x6
    assert scores["matte_mad"] == pytest.approx(16 / 64)  # 16 pixels differ by 1
    assert matte_scores(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))["matte_iou"] == 1.0


def test_lpips_says_why_it_is_not_computed(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    status = lpips_status()
    assert status is not None and status.startswith("LPIPS not computed: ")
    assert "torchvision" in status or str(tmp_path) in status


def test_eval_on_released_pairs_prints_table_1_and_writes_the_json(tmp_path, capsys):
    data = write_released_dataset(tmp_path / "test_pairs", count=4)
    model = save_tiny_wan_pipeline(tmp_path / "wan")
    report = tmp_path / "eval.json"
    argv = ["eval", "--model", str(model), "--data", str(data), "--split", "test", "--steps", "2"]
    assert main([*argv, "--guidance", "1", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "Vera-1.3B (paper)" in out and "35.2" in out and "25.3" in out and "VACE-14B (paper)" in out
    assert "LPIPS" in out and "matte IoU" in out
    saved = json.loads(report.read_text())
    assert (
        saved["summary"]["background_change"]["count"] == 2
        and saved["summary"]["object_addition"]["count"] == 2
    )
    assert {c["clip_id"] for c in saved["clips"]} == {"clip000", "clip001", "clip002", "clip003"}
    assert all(0 <= c["matte_iou"] <= 1 and c["psnr"] > 0 for c in saved["clips"])
