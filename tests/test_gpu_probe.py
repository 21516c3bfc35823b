"""`bench/gpu_probe.sh` runs dry (tiny shapes, CPU) end to end, so the probe a GPU loan runs cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_probe  # noqa: E402


@pytest.mark.slow
def test_probe_runs_dry_every_section_and_writes_lines_and_a_table(tmp_path):
    env = {**os.environ, "DRY": "1", "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_probe.sh"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "probe.jsonl").read_text().splitlines()]
    by_section = {}
    for row in rows:
        by_section.setdefault(row["section"], []).append(row)
    assert set(by_section) == set(gpu_probe.SECTIONS)
    problems = [row for row in rows if row["status"] not in ("ok", "skipped")]
    assert problems == []
    # Only what needs CUDA is skipped on the CPU.
    assert [(r["section"], r["case"]) for r in rows if r["status"] == "skipped"] == [
        ("offload_stream", "streams")
    ]
    cases = {(row["section"], row["case"]) for row in rows}
    assert {
        ("attention", "native"),
        ("step", "native"),
        ("step", "auto"),
        ("vae", "decode_float32"),
        ("vae", "decode_bfloat16"),
        ("offload_plain", "no_streams"),
        ("compile", "graph_breaks"),
        ("compile", "compiled_step"),
        ("train_lora", "lora_r4"),
        ("train_full", "full"),
    } <= cases
    assert next(r for r in rows if r["case"] == "graph_breaks")["graph_break_count"] == 0
    assert all(row["seconds"] > 0 for row in rows if row["status"] == "ok" and "seconds" in row)
    lora = next(r for r in rows if r["case"] == "lora_r4")
    full = next(r for r in rows if r["case"] == "full")
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"]
    table = (tmp_path / "out" / "probe.md").read_text()
    assert table.startswith("| section | case | status |") and len(table.splitlines()) == len(rows) + 2


def test_probe_records_a_section_that_did_not_finish(tmp_path):
    out = tmp_path / "probe.jsonl"
    (tmp_path / "step.log").write_text("loading...\nKilled\n")
    assert (
        gpu_probe.main(
            [
                "record",
                "--out",
                str(out),
                "--section",
                "step",
                "--status",
                "timeout",
                "--rc",
                "124",
                "--log",
                str(tmp_path / "step.log"),
                "--budget",
                "100",
            ]
        )
        == 0
    )
    row = json.loads(out.read_text())
    assert (row["section"], row["status"], row["rc"], row["budget_s"]) == ("step", "timeout", 124, 100)
    assert row["log_tail"].endswith("Killed\n")
    assert "| step | (section) | timeout |" in gpu_probe.table(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_probe_without_a_gpu_and_without_dry_says_so(tmp_path):
    out = tmp_path / "probe.jsonl"
    assert gpu_probe.main(["env", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["status"] == "skipped" and "DRY=1" in row["why"]
