"""vera_plugin.EngineClient: helpers, and the proof that it works with only grpcio and protobuf installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
from google import protobuf

from vera_engine.imaging.exr import write_exr
from vera_plugin.client import EngineClient, EngineError, format_frames, frame_path, parse_frames

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]


def test_parse_and_format_frames() -> None:
    assert parse_frames("1001-1004") == [1001, 1002, 1003, 1004]
    assert parse_frames("7") == [7]
    assert parse_frames("1,3, 5-7") == [1, 3, 5, 6, 7]
    assert parse_frames("-2-1") == [-2, -1, 0, 1]
    assert format_frames([1, 2, 3, 7, 9, 10]) == "1-3,7,9-10"
    for bad, message in (
        ("10-1", "ends before"),
        ("a-b", "is not N or A-B"),
        ("1-3,2", "more than once"),
        ("", "is not N"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_frames(bad)


def test_frame_path_patterns() -> None:
    assert frame_path("/s/plate.####.exr", 1001) == "/s/plate.1001.exr"
    assert frame_path("/s/plate.####.exr", 7) == "/s/plate.0007.exr"
    assert frame_path("/s/plate.%04d.exr", 12) == "/s/plate.0012.exr"
    assert frame_path("/s/plate.%d.exr", 12) == "/s/plate.12.exr"
    assert frame_path("/s/plate.@@@.exr", 5) == "/s/plate.005.exr"
    assert frame_path("/s/v#/plate.##.exr", 5) == "/s/v#/plate.05.exr"  # only the file name carries the token
    # Negative frames as printf's %04d writes them (Nuke, oiiotool): the sign counts in the width.
    assert frame_path("/s/plate.%04d.exr", -2) == "/s/plate.-002.exr" == "/s/plate.%04d.exr" % -2  # noqa: UP031
    assert frame_path("/s/plate.####.exr", -2) == "/s/plate.-002.exr"
    assert frame_path("/s/plate.####.exr", -12345) == "/s/plate.-12345.exr"
    with pytest.raises(ValueError, match="exactly one frame token"):
        frame_path("/s/plate.exr", 1)
    with pytest.raises(ValueError, match="exactly one frame token"):
        frame_path("/s/plate.##.#.exr", 1)


def test_client_side_errors_name_the_input(tmp_path: Path) -> None:
    client = EngineClient("127.0.0.1:1", timeout=2)
    with pytest.raises(FileNotFoundError, match=r"plate: 2 of 2 frames missing, first .*plate\.0001\.exr"):
        client.submit_files(str(tmp_path / "plate.####.exr"), [1, 2], prompt="x")
    with pytest.raises(TypeError, match="unknown job options"):
        client.submit_arrays(np.zeros((1, 16, 16, 3), np.float32), prompt="x", colour="ACEScg")
    with pytest.raises(ValueError, match="expected \\(frames, height, width, 3 or 4\\)"):
        client.submit_arrays(np.zeros((16, 16, 3), np.float32), prompt="x")
    with pytest.raises(EngineError) as err:
        client.info()
    assert err.value.code == "UNAVAILABLE" and "127.0.0.1:1" in str(err.value)
    client.close()


@pytest.fixture
def engine_address(passthrough_engine: str) -> str:
    return passthrough_engine


def _isolated_site(root: Path) -> Path:
    """A folder holding only grpcio, protobuf and the host packages: what a DCC's Python would have."""
    site = root / "site"
    site.mkdir()
    links = {
        "grpc": Path(grpc.__file__).parent,
        "google": Path(protobuf.__file__).parent.parent,
        "vera_plugin": REPO / "plugin" / "vera_plugin",
        "vera_proto": REPO / "proto" / "vera_proto",
    }
    # ... plus what grpcio itself requires (pip installs it with grpcio).
    import typing_extensions

    links["typing_extensions.py"] = Path(typing_extensions.__file__)
    for name, target in links.items():
        (site / name).symlink_to(target)
    return site


def test_client_works_with_only_grpcio_and_protobuf(engine_address: str, tmp_path: Path) -> None:
    frames = [1001, 1002]
    rng = np.random.default_rng(0)
    (tmp_path / "plate").mkdir()
    for frame in frames:
        write_exr(tmp_path / "plate" / f"plate.{frame}.exr", rng.random((20, 24, 3), dtype=np.float32), "RGB")
    site = _isolated_site(tmp_path)
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        sys.path[:0] = [{str(site)!r}]

        class Block(importlib.abc.MetaPathFinder):
            # Anything beyond grpcio + protobuf must not be needed.
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"numpy", "torch", "OpenImageIO", "PyOpenColorIO", "vera_engine",
                                           "diffusers", "transformers", "grpc_health", "grpc_reflection"}}:
                    raise ImportError("blocked: " + name)

        sys.meta_path.insert(0, Block())
        from vera_plugin.client import EngineClient
        from vera_plugin import cli

        with EngineClient({engine_address!r}) as client:
            client.wait_until_serving(20)
            info = client.info()
            job = client.submit_files({str(tmp_path / "plate" / "plate.####.exr")!r}, [1001, 1002],
                                      prompt="add a ball", steps=2, seed=3)
            updates = []
            final = client.wait(job, callback=updates.append)
            files = client.fetch(job, {str(tmp_path / "out")!r})
            jobs = client.list_jobs(states=["succeeded"])
        code = cli.main(["jobs", "--engine", {engine_address!r}, "--json"])
        print(json.dumps({{
            "model": info.models[0].name, "state": final.state, "updates": len(updates),
            "files": [f.name for f in files], "jobs": [j.job_id for j in jobs], "job": job, "cli": code,
            "heavy": sorted(m for m in ("numpy", "torch", "OpenImageIO") if m in sys.modules),
            "paths": [p for p in sys.path if "site-packages" in p],
        }}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["paths"] == [] and report["heavy"] == []  # really no site-packages, no numpy/torch
    # The job may finish before the watch attaches: at least the final status arrives.
    assert report["model"] == "passthrough" and report["state"] == 3 and report["updates"] >= 1
    assert report["files"] == ["vera_edit.1001.exr", "vera_edit.1002.exr"]
    assert report["jobs"] == [report["job"]] and report["cli"] == 0
    assert (tmp_path / "out" / "vera_edit.1002.exr").stat().st_size > 0
