"""The paper's scores (Table 1, §4.1.2) on released-layout test pairs, computed with torchmetrics.

Content preservation compares the edited video with the **source** video (what an edit must not change):

* object addition over the whole frame;
* background change over the preserved region: where the ground-truth matte is 0 (the kept subject);

as PSNR (from the mean squared error over every selected sample of the clip), SSIM (torchmetrics' Gaussian-window
SSIM map, 11 px, sigma 1.5, averaged over the selected pixels of every frame) and LPIPS (AlexNet; frames with the
non-preserved region taken from the source, averaged over frames) where torchmetrics can run it offline: it needs
torchvision and the AlexNet weights in the torch hub cache; when they are missing the report says so instead of a
number. The predicted matte is scored against the released alpha: IoU of the two mattes above 0.5 and the mean
absolute difference (MAD).

The paper's own rows are printed beside ours for reference (Vera-1.3B and VACE-14B, Table 1).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vera_engine.training.data.dataset import LayeredClip

# Table 1 of the paper (preservation; VACE-14B's SSIM and LPIPS are not quoted here).
PAPER_ROWS: dict[str, dict[str, dict[str, float | None]]] = {
    "Vera-1.3B (paper)": {
        "background_change": {"psnr": 35.2, "ssim": 0.993, "lpips": 0.010},
        "object_addition": {"psnr": 25.3, "ssim": 0.949, "lpips": 0.078},
    },
    "VACE-14B (paper)": {
        "background_change": {"psnr": 31.7, "ssim": None, "lpips": None},
        "object_addition": {"psnr": 10.1, "ssim": None, "lpips": None},
    },
}
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
PSNR_CAP_DB = 100.0  # identical videos have infinite PSNR; averages need a number


def _frames_first(video: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) in [0, 1] -> (F, 3, H, W) float64 tensor (what torchmetrics' image metrics take)."""
    return torch.from_numpy(np.ascontiguousarray(video, dtype=np.float64)).permute(0, 3, 1, 2)


def preserved_region(clip: LayeredClip) -> np.ndarray:
    """The (F, H, W) region preservation is scored on: all of it (object addition), or ground-truth alpha == 0."""
    if clip.task == "background_change":
        return clip.alpha == 0
    return np.ones(clip.alpha.shape, dtype=bool)


def region_psnr(prediction: np.ndarray, reference: np.ndarray, region: np.ndarray) -> float:
    """PSNR (dB, data range 1) over the samples of ``region`` (F, H, W) in every channel; capped at PSNR_CAP_DB."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if not region.any():
        raise ValueError("the preserved region is empty: there is nothing to score")
    selected = np.broadcast_to(region[..., None], prediction.shape)
    pred = torch.from_numpy(np.ascontiguousarray(prediction[selected], dtype=np.float64))
    ref = torch.from_numpy(np.ascontiguousarray(reference[selected], dtype=np.float64))
    if torch.equal(pred, ref):
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, float(peak_signal_noise_ratio(pred, ref, data_range=1.0)))


def region_ssim(prediction: np.ndarray, reference: np.ndarray, region: np.ndarray) -> float:
    """Mean of torchmetrics' SSIM map (channels averaged) over the pixels of ``region`` in every frame."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, ssim_map = structural_similarity_index_measure(
        _frames_first(prediction), _frames_first(reference), data_range=1.0, return_full_image=True
    )
    per_pixel = ssim_map.mean(dim=1).numpy()  # (F, H, W)
    return float(per_pixel[region].mean())


def lpips_status() -> str | None:
    """None when LPIPS can run offline here, else why not."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return "LPIPS not computed: torchmetrics' LPIPS needs torchvision, which is not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not weights.is_file():
        return f"LPIPS not computed: the AlexNet weights are not present locally ({weights})"
    return None


def region_lpips(prediction: np.ndarray, reference: np.ndarray, region: np.ndarray) -> float:
    """LPIPS (AlexNet) per frame, the non-preserved region taken from ``reference``, averaged over frames."""
    from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

    inside = region[..., None]
    shown = np.where(inside, prediction, reference)
    pred, ref = _frames_first(shown).float(), _frames_first(reference).float()
    return float(learned_perceptual_image_patch_similarity(pred, ref, net_type="alex", normalize=True))


def matte_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """IoU of the mattes above 0.5 (1 when both are empty) and their mean absolute difference."""
    from torchmetrics.functional import mean_absolute_error
    from torchmetrics.functional.classification import binary_jaccard_index

    pred = torch.from_numpy(np.ascontiguousarray(predicted, dtype=np.float32)).clamp(0, 1)
    gt = torch.from_numpy(np.ascontiguousarray(truth, dtype=np.float32))
    iou = binary_jaccard_index(pred, (gt > 0.5).long(), threshold=0.5, zero_division=1.0)
    return {"matte_iou": float(iou), "matte_mad": float(mean_absolute_error(pred, gt))}


def score_clip(clip: LayeredClip, prediction: Mapping[str, np.ndarray], *, lpips: bool) -> dict[str, Any]:
    """The paper's scores of one predicted clip (``composite``, ``alpha``) against its ground truth ``clip``."""
    region = preserved_region(clip)
    composite = np.clip(np.asarray(prediction["composite"], dtype=np.float32), 0.0, 1.0)
    scores: dict[str, Any] = {
        "clip_id": clip.clip_id,
        "task": clip.task,
        "psnr": region_psnr(composite, clip.input, region),
        "ssim": region_ssim(composite, clip.input, region),
        **matte_scores(prediction["alpha"], clip.alpha),
    }
    if lpips:
        scores["lpips"] = region_lpips(composite, clip.input, region)
    return scores


def summarize_scores(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of each score per task, with the clip count."""
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for result in results:
        by_task.setdefault(result["task"], []).append(result)
    summary = {}
    for task, rows in sorted(by_task.items()):
        names = [k for k, v in rows[0].items() if isinstance(v, float)]
        summary[task] = {
            "count": float(len(rows)),
            **{k: float(np.mean([r[k] for r in rows])) for k in names},
        }
    return summary


def evaluate_released(
    pipe: Any,
    data: str | Path,
    split: str = "test",
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    format: str = "auto",
    frames: int | None = None,
    size: tuple[int, int] | None = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Edit every test pair of ``split`` with ``pipe`` as the product does and score it as the paper does."""
    from vera_engine.training.data.released import iter_split_clips
    from vera_engine.training.evaluate import predict_clip

    steps = steps if steps is not None else int(pipe.config.get("default_steps", 20))
    guidance = guidance if guidance is not None else float(pipe.config.get("default_guidance", 1.0))
    why_no_lpips = lpips_status()
    started = time.perf_counter()
    results = []
    for clip in iter_split_clips(data, split, format=format, frames=frames, size=size, skip_bad=skip_bad):
        prediction = predict_clip(pipe, clip, steps=steps, guidance=guidance, seed=seed)
        results.append(score_clip(clip, prediction, lpips=why_no_lpips is None))
    return {
        "split": split,
        "data": str(data),
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "lpips": why_no_lpips or "computed (AlexNet, torchmetrics)",
        "summary": summarize_scores(results),
        "paper": PAPER_ROWS,
        "clips": results,
    }


def _cell(value: float | None, digits: int) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_paper_table(report: Mapping[str, Any], model_name: str = "this model") -> str:
    """Table 1's preservation columns for this model beside the paper's rows, then matte IoU / MAD."""
    tasks = ("background_change", "object_addition")
    header = f"{'':<22}" + "".join(f"{t.replace('_', ' '):^27}" for t in tasks)
    sub = f"{'':<22}" + "".join(f"{'PSNR':>9}{'SSIM':>9}{'LPIPS':>9}" for _ in tasks)
    lines = [
        f"split {report['split']} of {report['data']}: {report['steps']} steps, guidance {report['guidance']:g}, "
        f"{report['seconds']:.1f} s",
        header,
        sub,
    ]
    summary = report["summary"]

    def row(name: str, values: Mapping[str, Mapping[str, float | None]]) -> str:
        cells = ""
        for task in tasks:
            v = values.get(task, {})
            cells += f"{_cell(v.get('psnr'), 1):>9}{_cell(v.get('ssim'), 3):>9}{_cell(v.get('lpips'), 3):>9}"
        return f"{name:<22}{cells}"

    counts = ", ".join(f"{t}: {int(s['count'])} clips" for t, s in summary.items())
    lines.append(row(f"{model_name}"[:22], summary))
    lines += [row(name, values) for name, values in report["paper"].items()]
    lines.append(f"clips: {counts}; {report['lpips']}")
    for task, values in summary.items():
        lines.append(f"  {task}: matte IoU {values['matte_iou']:.3f}, matte MAD {values['matte_mad']:.4f}")
    return "\n".join(lines)


def write_paper_report(report: Mapping[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
