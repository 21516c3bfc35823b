"""The vera.v1 contract: checked-in generated code matches the .proto, imports cleanly, documents its rpcs."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROTO = REPO / "proto" / "vera" / "v1" / "engine.proto"
GENERATED = REPO / "proto" / "vera_proto"


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the code")
    out = tmp_path / "gen"
    subprocess.run(
        [sys.executable, str(REPO / "proto" / "codegen.py"), "--out", str(out)], check=True, timeout=120
    )
    generated = sorted(p.relative_to(out) for p in out.rglob("*.py"))
    assert generated == [
        Path("vera/__init__.py"),
        Path("vera/v1/__init__.py"),
        Path("vera/v1/engine_pb2.py"),
        Path("vera/v1/engine_pb2_grpc.py"),
    ]
    stale = [str(p) for p in generated if not filecmp.cmp(out / p, GENERATED / p, shallow=False)]
    assert not stale, f"checked-in code differs from the .proto; run `python proto/codegen.py`: {stale}"


def test_generated_modules_import_as_package() -> None:
    from vera_proto.vera.v1 import engine_pb2, engine_pb2_grpc

    assert engine_pb2.DESCRIPTOR.package == "vera.v1"
    assert hasattr(engine_pb2_grpc, "EngineStub") and hasattr(engine_pb2_grpc, "add_EngineServicer_to_server")
    text = (GENERATED / "vera" / "v1" / "engine_pb2_grpc.py").read_text()
    assert "from vera_proto.vera.v1 import engine_pb2" in text
    assert not re.search(r"^from vera\.v1 ", text, flags=re.MULTILINE)


def test_service_shape() -> None:
    from vera_proto.vera.v1 import engine_pb2

    service = engine_pb2.DESCRIPTOR.services_by_name["Engine"]
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert kinds == {
        "GetInfo": (False, False),
        "Submit": (True, False),
        "Watch": (False, True),
        "Fetch": (False, True),
        "Cancel": (False, False),
        "ListJobs": (False, False),
    }


def test_every_rpc_documents_its_kind() -> None:
    """route_guide style: the comment above each rpc names its kind and, when it streams, why."""
    text = PROTO.read_text()
    for match in re.finditer(
        r"((?:[ \t]*//.*\n)+)[ \t]*rpc (\w+)\((stream )?\w+\) returns \((stream )?\w+\)", text
    ):
        comment, name, client_stream, server_stream = match.groups()
        comment = comment.lower()
        if client_stream:
            assert "client streaming" in comment, name
        elif server_stream:
            assert "server streaming" in comment, name
        else:
            assert "unary" in comment, name
    assert len(re.findall(r"^\s*rpc ", text, flags=re.MULTILINE)) == 6
    assert len(re.findall(r"//.*\n\s*rpc ", text)) == 6
