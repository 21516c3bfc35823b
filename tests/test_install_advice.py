"""What to install when the host code does not import: written once (`vera_plugin.install_advice`), said the same
way by the Nuke menu and self-test and both Resolve scripts, and importable where grpcio/protobuf are not."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from vera_plugin.install_advice import what_to_install

REPO = Path(__file__).resolve().parents[1]

PROTOBUF_TOO_OLD = (
    "Detected incompatible Protobuf Gencode/Runtime versions when loading vera/v1/engine.proto: gencode 7.35.1 "
    "runtime 6.30.0. Runtime version cannot be older than the linked gencode version."
)
GRPC_TOO_OLD = (
    "The grpc package installed is at version 1.60.0, but the generated code in vera/v1/engine_pb2_grpc.py "
    "depends on grpcio>=1.85.1. Please upgrade your grpc module to grpcio>=1.85.1 or downgrade your generated "
    "code using grpcio-tools<=1.60.0."
)


def test_the_advice_names_versions_and_each_hosts_pip_flags() -> None:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert what_to_install(RuntimeError(PROTOBUF_TOO_OLD), "resolve") == (
        "protobuf 6.30.0 is older than the protobuf 7.35.1 Vera Edit's generated code needs: python3 -m pip "
        f"install 'protobuf>=7.35.1,<8' for the Python {python} Resolve uses"
    )
    assert what_to_install(RuntimeError(GRPC_TOO_OLD), "nuke") == (
        "grpcio 1.60.0 is older than the grpcio 1.85.1 Vera Edit's generated code needs: python3 -m pip install "
        f"--user --upgrade 'grpcio>=1.85.1' for Nuke's Python {python}"
    )
    assert what_to_install(ImportError("No module named 'grpc'"), "nuke").startswith(
        "install grpcio and protobuf for Nuke's Python"
    )
    with pytest.raises(KeyError):
        what_to_install(ImportError("x"), "houdini")


def test_the_advice_imports_where_grpc_and_protobuf_do_not() -> None:
    """The whole point of the module: a DCC Python without grpcio/protobuf still gets the sentence."""
    code = (
        "import importlib.abc, sys\n"
        "class Missing(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('grpc', 'google'):\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Missing())\n"
        "from vera_plugin.install_advice import what_to_install\n"
        "try:\n"
        "    import vera_plugin.client\n"
        "except ImportError as exc:\n"
        "    print(what_to_install(exc, 'resolve'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("install grpcio and protobuf for the Python"), out.stdout


@pytest.mark.parametrize("script", ["Vera Edit.py", "Vera Self-test.py"])
def test_both_resolve_scripts_give_the_shared_advice(
    script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.abc

    target = "vera_plugin.hosts.resolve." + ("window" if script == "Vera Edit.py" else "selftest")

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname: str, path: object = None, target_: object = None) -> None:
            if fullname == target:
                raise RuntimeError(GRPC_TOO_OLD)

    monkeypatch.delitem(sys.modules, target, raising=False)
    monkeypatch.setattr(sys, "meta_path", [Refuse(), *sys.meta_path])
    runpy.run_path(str(REPO / "resolve_scripts" / "Utility" / script), init_globals={"resolve": None})
    out = capsys.readouterr().out
    assert what_to_install(RuntimeError(GRPC_TOO_OLD), "resolve") in out, out


def test_the_nuke_check_falls_back_when_vera_plugin_is_not_on_the_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.abc

    class NoPlugin(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
            if fullname.startswith("vera_plugin"):
                raise ImportError(f"No module named {fullname!r}")

    check = runpy.run_path(str(REPO / "nuke_gizmos" / "vera_install_check.py"))
    shared = check["what_to_install"](RuntimeError(GRPC_TOO_OLD))
    assert shared == what_to_install(RuntimeError(GRPC_TOO_OLD), "nuke")
    for name in [m for m in sys.modules if m.startswith("vera_plugin")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [NoPlugin(), *sys.meta_path])
    assert check["what_to_install"](RuntimeError(GRPC_TOO_OLD)).startswith(
        "install vera_plugin for Nuke's Python"
    )
