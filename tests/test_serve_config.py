"""`vera-engine serve`'s flags are `ServeConfig`'s fields (tools/config_cli.py), and `run_serve` takes a ServeConfig."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest

from vera_engine.service.serve import ServeConfig, memory_options, pool_backend, run_serve
from vera_engine.tools.cli import build_parser
from vera_engine.tools.config_cli import add_config_arguments, config_from_arguments, given

# What `vera-engine serve --spool S` meant before the flags were made from ServeConfig (read off the hand-written
# argparse it replaced). `lora` was None there: no adapter, as the empty list is now. `text_encoder_offload` was
# "none" there; "auto" since issue 27 item 6 (the text encoder off the GPU between encodes on CUDA).
TODAYS_DEFAULTS = {
    "model": "default",
    "host": "127.0.0.1",
    "port": 50051,
    "spool": Path("S"),
    "device": None,
    "lora": [],
    "attention_backend": None,
    "compile": None,
    "text_encoder_offload": "auto",
    "group_offload": None,
    "offload_to_disk": None,
    "offload_stream": None,
    "model_cpu_offload": False,
    "vae_tiling": False,
    "devices": None,
    "cluster": None,
    "gpus_per_job": 1,
    "context_parallel": "ulysses",
    "shared_spool": False,
    "allow_remote_ray": False,
    "worker_resource": "GPU",
    "allowed_roots": [],
    "decode_memory": None,
    "queue_size": 32,
    "retention_hours": 72.0,
    "preview_interval": 1.0,
    "token_file": None,
    "tls_cert": None,
    "tls_key": None,
    "insecure": False,
    "log_level": "INFO",
}

SPEED = "speed and memory (docs/BENCHMARKS.md has the figures)"
POOL = "several devices behind one engine (README: Scaling out)"


def _serve_parser() -> argparse.ArgumentParser:
    subparsers = next(
        action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)
    )
    return subparsers.choices["serve"]


def _serve_help() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    return out.getvalue()


def _config(*flags: str) -> ServeConfig:
    return config_from_arguments(ServeConfig, _serve_parser().parse_args(["--spool", "S", *flags]))


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def test_every_serve_flag_is_a_config_field_and_every_field_a_flag() -> None:
    text = _serve_help()
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text)) - {"--help"}
    # `--no-compile` is `--compile`'s other half, not a setting of its own.
    shown = {flag for flag in shown if not (flag.startswith("--no-") and "--" + flag[5:] in shown)}
    # Flags named inside help texts (e.g. "with --group-offload 1") are flags too, so they must be fields as well.
    fields = {_flag(field): field.name for field in dataclasses.fields(ServeConfig)}
    assert shown == set(fields), (shown - set(fields), set(fields) - shown)
    # And back: each flag writes its own field, and nothing else is parsed into the namespace.
    dests = {
        option: action.dest
        for action in _serve_parser()._actions
        for option in action.option_strings
        if action.dest != "help" and not option.startswith("--no-")
    }
    assert dests == fields


def test_serve_defaults_are_what_they_were() -> None:
    config = _config()
    assert dataclasses.asdict(config) == TODAYS_DEFAULTS
    assert config == ServeConfig(spool=Path("S"))
    # The defaults are ServeConfig's own: argparse leaves each one None, so `given` tells what was typed.
    args = _serve_parser().parse_args(["--spool", "S"])
    assert not any(given(args, name) for name in TODAYS_DEFAULTS if name != "spool")


def test_serve_flags_parse_to_their_types() -> None:
    config = _config(
        *("--port", "0", "--group-offload", "2", "--decode-memory", "1.5", "--queue-size", "4"),
        *("--retention-hours", "0.5", "--preview-interval", "2", "--gpus-per-job", "2", "--token-file", "t"),
        *("--tls-cert", "c", "--tls-key", "k", "--offload-to-disk", "d", "--insecure", "--model-cpu-offload"),
    )
    assert (config.port, config.group_offload, config.queue_size, config.gpus_per_job) == (0, 2, 4, 2)
    assert (config.decode_memory, config.retention_hours, config.preview_interval) == (1.5, 0.5, 2.0)
    assert (config.token_file, config.tls_cert, config.tls_key) == (Path("t"), Path("c"), Path("k"))
    assert config.offload_to_disk == "d" and config.insecure and config.model_cpu_offload
    assert isinstance(config.spool, Path)
    with pytest.raises(SystemExit):
        _config("--text-encoder-offload", "gpu")
    with pytest.raises(SystemExit):
        _config("--context-parallel", "tree")
    with pytest.raises(SystemExit):  # --spool is required
        _serve_parser().parse_args([])


def test_repeatable_and_on_off_serve_flags() -> None:
    config = _config("--lora", "a=/x", "--lora", "b=/y", "--allow-root", "/r1", "--allow-root", "/r2")
    assert config.lora == ["a=/x", "b=/y"]
    assert config.allowed_roots == [Path("/r1"), Path("/r2")]
    # Each parse starts a new list: the dataclass's default is not appended to.
    assert _config().allowed_roots == [] and ServeConfig(spool=Path("S")).lora == []
    assert _config("--compile").compile is True
    assert _config("--no-compile").compile is False
    assert _config().compile is None  # neither: the engine decides (on for CUDA without offloading)
    assert _config("--offload-stream").offload_stream is True
    assert _config("--no-offload-stream").offload_stream is False


def test_serve_help_keeps_its_groups() -> None:
    parser = _serve_parser()
    group_of = {
        action.dest: group.title for group in parser._action_groups for action in group._group_actions
    }
    for field in dataclasses.fields(ServeConfig):
        assert group_of[field.name] == field.metadata.get("group", "options"), field.name
    assert group_of["compile"] == SPEED and group_of["worker_resource"] == POOL
    text = _serve_help()
    assert text.index(SPEED + ":") < text.index("\n  --attention-backend NAME") < text.index(POOL + ":")
    assert "(default: 50051)" in text and "(default: GPU)" in text and "(default: None)" not in text


def test_a_new_field_is_a_new_flag() -> None:
    @dataclasses.dataclass(kw_only=True)
    class Wider(ServeConfig):
        workers_per_node: int = dataclasses.field(default=3, metadata={"help": "x", "group": POOL})

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Wider)
    assert "--workers-per-node" in parser.format_help()
    assert config_from_arguments(Wider, parser.parse_args(["--spool", "S"])).workers_per_node == 3
    args = parser.parse_args(["--spool", "S", "--workers-per-node", "5"])
    assert config_from_arguments(Wider, args).workers_per_node == 5


def test_a_serve_config_built_in_python() -> None:
    config = ServeConfig(spool="/var/spool/vera", allowed_roots=["/shows"], token_file="tokens")
    assert config.spool == Path("/var/spool/vera") and config.allowed_roots == [Path("/shows")]
    assert config.token_file == Path("tokens")
    with pytest.raises(TypeError):  # spool has no default
        ServeConfig()
    from vera_engine.acceleration.memory import MemoryOptions

    assert memory_options(config) is None
    assert memory_options(dataclasses.replace(config, group_offload=2, vae_tiling=True)) == MemoryOptions(
        group_offload="block", num_blocks_per_group=2, vae_tiling=True
    )
    with pytest.raises(ValueError, match="--offload-to-disk needs --group-offload"):
        memory_options(dataclasses.replace(config, offload_to_disk="d"))
    assert pool_backend(config) is None
    with pytest.raises(ValueError, match="choose one"):
        pool_backend(dataclasses.replace(config, devices="cpu", cluster="auto"))


def test_run_serve_takes_a_config_and_refuses_before_binding(tmp_path: Path, capsys) -> None:
    spool = tmp_path / "spool"
    assert run_serve(ServeConfig(spool=spool, host="0.0.0.0", port=0)) == 2
    assert "--token-file and --tls-cert/--tls-key" in capsys.readouterr().err
    assert run_serve(ServeConfig(spool=spool, port=0, allowed_roots=[tmp_path / "none"])) == 2
    assert "not a folder" in capsys.readouterr().err
    # The command line's namespace is accepted too (it is what `vera-engine serve` hands its handler).
    args = _serve_parser().parse_args(["--spool", str(spool), "--port", "0", "--queue-size", "0"])
    assert run_serve(args) == 2
    assert "--queue-size 0: expected at least 1" in capsys.readouterr().err
    # The repeated --lora values reach the runner's adapter check as a list.
    args = _serve_parser().parse_args(
        ["--spool", str(spool), "--port", "0", "--lora", "a=/x", "--lora", "a=/y"]
    )
    assert run_serve(args) == 2
    assert "--lora a is given twice" in capsys.readouterr().err
    assert not spool.exists()


def test_config_cli_features_on_a_small_config() -> None:
    """The generic parts serve needs and train does not: groups, repeatable flags, on/off flags, Path fields."""

    @dataclasses.dataclass(kw_only=True)
    class Small:
        out: Path = dataclasses.field(metadata={"help": "where"})
        roots: list[Path] = dataclasses.field(default_factory=list, metadata={"group": "G", "help": "r"})
        fast: bool | None = dataclasses.field(default=None, metadata={"group": "G", "help": "f"})
        log: Path | None = dataclasses.field(default=None, metadata={"help": "l", "show_default": False})
        size: tuple[int, int] | None = dataclasses.field(
            default=None, metadata={"type": int, "nargs": 2, "help": "s"}
        )

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Small)
    text = parser.format_help()
    assert "G:\n  --roots ROOTS" in text and "--fast, --no-fast" in text
    assert "  -l" not in text and "l (default" not in text and "s (default: None)" in text
    args = parser.parse_args(["--out", "o", "--roots", "a", "--roots", "b", "--no-fast", "--log", "x"])
    assert given(args, "roots") and given(args, "fast") and not given(args, "size")
    small = config_from_arguments(Small, parser.parse_args(["--out", "o", "--size", "1", "2"]))
    assert small == Small(out=Path("o"), size=(1, 2))
    assert config_from_arguments(Small, args) == Small(
        out=Path("o"), roots=[Path("a"), Path("b")], fast=False, log=Path("x")
    )
