"""Context parallelism (Ulysses and ring) across two gloo CPU processes equals the model on one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vera_engine.acceleration.parallel import (
    context_parallel_config,
    enable_context_parallel,
    init_distributed,
)
from vera_engine.pipelines.presets import build_random_transformer

WORKER = Path(__file__).parent / "workers" / "context_parallel_check.py"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_two_gloo_processes_give_the_single_process_result(kind, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun comes with torch"
    out = tmp_path / f"{kind}.json"
    run = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(WORKER), kind, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    # The sequence really was split: this rank's blocks saw half of every layer's tokens in both forwards.
    assert result["tokens_seen_by_a_rank"] == [result["tokens_per_layer"] // 2] * 2
    assert result["ring_refused_with_native"] is (True if kind == "ring" else None)
    assert {"rope", "blocks.0", "branches.edit.proj_out"} <= set(result["hooks"])
    # Same velocities (float32 summation order differs only) for a transformer with every condition active...
    assert result["transformer_scale"] > 0.5
    assert result["transformer"] < 1e-5 and result["transformer_no_mask"] < 1e-5
    # ...and the same layers out of a whole CFG sampling run of the shipped checkpoint, on every rank...
    assert result["pipeline"] < 1e-4
    # ...with the text encode (prompt and negative: one call) and the two VAE encodes on rank 0 only, and the three
    # decodes shared out (edit + alpha batched on rank 0, the composite on rank 1).
    assert result["work_per_rank"] == [
        {"text_encoder": 1, "encode_video": 2, "decoded_layers": 2},
        {"text_encoder": 0, "encode_video": 0, "decoded_layers": 1},
    ]


def test_context_parallel_config_and_errors(monkeypatch):
    assert context_parallel_config("ulysses", 2).ulysses_degree == 2
    assert context_parallel_config("ring", 4).ring_degree == 4
    with pytest.raises(ValueError, match="expected 'ulysses' or 'ring'"):
        context_parallel_config("tensor", 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected 2 or more"):
        context_parallel_config("ring", 1)
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised"):
        enable_context_parallel(build_random_transformer("tiny"), "ulysses")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        init_distributed("cpu")
