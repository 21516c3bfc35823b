"""``vera-engine serve``: the command line that starts an engine process (arguments, model and memory options,
binding and security checks, signal handling); the service itself is in `engine.py` and `servicer.py`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vera_engine.service import auth, safe_files
from vera_engine.service.engine import DEFAULT_QUEUE, DEFAULT_RETENTION_HOURS, Engine
from vera_engine.service.errors import SpoolInUse
from vera_engine.service.servicer import DEFAULT_PORT, create_server

if TYPE_CHECKING:
    from vera_engine.acceleration.memory import MemoryOptions
    from vera_engine.service.pool import PoolBackend

log = logging.getLogger("vera_engine.service")


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` command to ``vera-engine``'s subparsers."""
    parser = subparsers.add_parser(
        "serve",
        help="run the gRPC engine service",
        description="Run the Vera Edit engine: a gRPC service (vera.v1.Engine) with a durable job queue.",
    )
    _serve_arguments(parser)
    parser.set_defaults(handler=run_serve)
    return parser


_SPEED = "speed and memory (docs/BENCHMARKS.md has the figures)"
_POOL = "several devices behind one engine (README: Scaling out)"


def _setting(default: object = MISSING, *, factory: object = MISSING, **metadata: object) -> Any:
    """A `ServeConfig` field: its default and, as metadata, its help and command-line form (tools/config_cli.py)."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# RUF009 below: `_setting` returns a `dataclasses.field`; list defaults come from a factory, one list per config.
@dataclass(kw_only=True)
class ServeConfig:
    """Everything `vera-engine serve` is started with; `run_serve(ServeConfig(spool=...))` starts the same engine
    from Python.

    The fields are also the command's flags (`--field-name` unless a `flag` says otherwise), with these defaults
    and help texts; `group` puts a flag under a heading of `--help`. Paths may be given as text.
    """

    model: str = _setting("default", metavar="DIR|default", help="model folder, or 'default'")
    host: str = _setting("127.0.0.1", help="address to bind")
    port: int = _setting(DEFAULT_PORT, help="port, 0 = any free")
    spool: Path = _setting(  # noqa: RUF009
        metavar="DIR", help="folder for job inputs, results and state"
    )
    device: str | None = _setting(
        None, show_default=False, help="torch device (default: cuda if available, else cpu)"
    )
    lora: list[str] = _setting(  # noqa: RUF009
        factory=list,
        show_default=False,
        metavar="NAME=PATH",
        help="serve a LoRA adapter of --model (from `vera-engine train --lora`) as job option lora=NAME; repeatable",
    )
    attention_backend: str | None = _setting(
        None,
        group=_SPEED,
        show_default=False,
        metavar="NAME",
        help="diffusers attention backend for the joint attention: native, _native_cudnn, flash, _flash_3, sage "
        "(8-bit, approximate), ... (default: the one picked for the device, docs/GPU.md)",
    )
    compile: bool | None = _setting(
        None,
        group=_SPEED,
        help="torch.compile the repeated MoT block (the first job compiles; default: on for CUDA without offloading)",
    )
    text_encoder_offload: str = _setting(
        "auto",
        group=_SPEED,
        # acceleration.memory.TEXT_ENCODER_OFFLOAD (not imported: it loads torch, and `--help` should not).
        choices=("auto", "none", "cpu", "swap"),
        help="auto: swap on CUDA, none elsewhere; none: the text encoder stays on the device; cpu: it stays on the "
        "CPU and encodes there; swap: it visits the GPU only to encode, from pinned memory on CUDA",
    )
    group_offload: int | None = _setting(
        None,
        group=_SPEED,
        show_default=False,
        metavar="BLOCKS",
        help="keep the transformer in CPU memory and bring BLOCKS MoT blocks at a time onto the device",
    )
    offload_to_disk: str | None = _setting(
        None,
        group=_SPEED,
        show_default=False,
        metavar="DIR",
        help="with --group-offload: page the blocks from files in DIR",
    )
    offload_stream: bool | None = _setting(
        None,
        group=_SPEED,
        help="with --group-offload 1: prefetch the next block on a side stream (default: on for CUDA)",
    )
    model_cpu_offload: bool = _setting(
        False, group=_SPEED, help="whole components visit the device one at a time"
    )
    vae_tiling: bool = _setting(False, group=_SPEED, help="encode and decode the Wan VAE in tiles")
    devices: str | None = _setting(
        None,
        group=_POOL,
        show_default=False,
        metavar="LIST",
        help="one worker process per device of this machine, e.g. cuda:0,cuda:1 (cpu may repeat: cpu,cpu)",
    )
    cluster: str | None = _setting(
        None,
        group=_POOL,
        show_default=False,
        metavar="ADDRESS",
        help="run jobs on Ray actors of a Ray cluster: auto, HEAD:6379 or ray://HEAD:10001 (needs the cluster "
        "extra: pip install -e '.[cluster]' in the checkout)",
    )
    gpus_per_job: int = _setting(
        1,
        group=_POOL,
        metavar="N",
        help="devices per job, split by context parallelism (a Ray placement group on one node, or N of --devices)",
    )
    context_parallel: str = _setting(
        "ulysses",
        group=_POOL,
        choices=("ulysses", "ring"),
        help="how a job over several devices splits attention (ring needs an --attention-backend that returns the "
        "log-sum-exp, e.g. _native_cudnn or flash)",
    )
    shared_spool: bool = _setting(
        False,
        group=_POOL,
        help="with --cluster: the workers see --spool at the same path, so frames and results are not sent "
        "through Ray's object store",
    )
    allow_remote_ray: bool = _setting(
        False,
        group=_POOL,
        help="with --cluster ray://HOST:PORT: connect to a Ray Client server on another machine (secure the cluster "
        "first: RAY_AUTH_MODE=token, TLS, firewalled ports; docs/SECURITY.md)",
    )
    worker_resource: str = _setting(
        "GPU",
        group=_POOL,
        metavar="NAME",
        help="with --cluster: the Ray resource one worker takes per device: GPU, CPU (one worker per CPU) or a "
        "custom resource of the nodes; other than GPU, workers run on the CPU",
    )
    allowed_roots: list[Path] = _setting(  # noqa: RUF009
        factory=list,
        flag="--allow-root",
        show_default=False,
        metavar="DIR",
        help="folder under which clients may send frames by path (repeatable; default: none)",
    )
    decode_memory: float | None = _setting(
        None,
        show_default=False,
        metavar="GIB",
        help="memory all EXR decodes in flight may take together, uploads and jobs (default: 8 GiB, at most a "
        "quarter of this machine's memory); a frame needing more is refused",
    )
    queue_size: int = _setting(DEFAULT_QUEUE, help="jobs that may wait")
    retention_hours: float = _setting(DEFAULT_RETENTION_HOURS, help="keep finished jobs' results this long")
    preview_interval: float = _setting(1.0, help="seconds between previews")
    token_file: Path | None = _setting(  # noqa: RUF009
        None, show_default=False, metavar="FILE", help="file with accepted bearer tokens, one per line"
    )
    tls_cert: Path | None = _setting(  # noqa: RUF009
        None, show_default=False, metavar="PEM", help="PEM certificate chain for TLS"
    )
    tls_key: Path | None = _setting(  # noqa: RUF009
        None, show_default=False, metavar="PEM", help="PEM private key for TLS"
    )
    insecure: bool = _setting(False, help="allow a non-loopback bind without token and TLS (not advised)")
    log_level: str = _setting("INFO", help="logging level")

    def __post_init__(self) -> None:
        # A TD writing ServeConfig(spool="/var/spool/vera") gets the Paths the flags would have made.
        self.spool = Path(self.spool)
        self.allowed_roots = [Path(root) for root in self.allowed_roots]
        for name in ("token_file", "tls_cert", "tls_key"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from vera_engine.tools.config_cli import add_config_arguments

    add_config_arguments(parser, ServeConfig)


def memory_options(config: ServeConfig) -> MemoryOptions | None:
    """The speed and memory settings as `vera_engine.acceleration.memory.MemoryOptions`, or None when none is given (all on the device)."""
    from vera_engine.acceleration.memory import MemoryOptions

    if config.group_offload is not None and config.group_offload < 1:
        raise ValueError(f"--group-offload {config.group_offload}: expected 1 or more MoT blocks at a time")
    if config.model_cpu_offload and (
        config.group_offload is not None or config.text_encoder_offload not in ("auto", "none")
    ):
        raise ValueError(
            "--model-cpu-offload moves whole components itself: drop --group-offload / --text-encoder-offload"
        )
    if config.offload_to_disk and config.group_offload is None:
        raise ValueError("--offload-to-disk needs --group-offload BLOCKS")
    if config.offload_stream and config.group_offload is None:
        raise ValueError("--offload-stream needs --group-offload 1")
    options = MemoryOptions(
        text_encoder_offload=config.text_encoder_offload,
        group_offload="block" if config.group_offload is not None else None,
        num_blocks_per_group=config.group_offload if config.group_offload is not None else 1,
        use_stream=config.offload_stream,
        offload_to_disk=config.offload_to_disk,
        model_cpu_offload=config.model_cpu_offload,
        vae_tiling=config.vae_tiling,
    )
    return None if options == MemoryOptions() else options


def pool_backend(config: ServeConfig) -> PoolBackend | None:
    """The pool the settings ask for (`service.pool`), or None for one in-process worker on one device.

    Raises ValueError naming the flag for combinations that cannot work, and the Ray backend's ClusterError for a
    cluster that does not answer or has no worker resources.
    """
    if config.devices and config.cluster:
        raise ValueError("--devices and --cluster: choose one (local processes, or Ray actors)")
    if not (config.devices or config.cluster):
        if config.gpus_per_job != 1:
            raise ValueError(f"--gpus-per-job {config.gpus_per_job} needs --devices or --cluster")
        if config.shared_spool:
            raise ValueError("--shared-spool needs --cluster")
        return None
    if config.device is not None:
        raise ValueError(
            "--device picks one device; with --devices or --cluster the pool's workers pick theirs"
        )
    if config.shared_spool and not config.cluster:
        raise ValueError("--shared-spool needs --cluster (local workers always use the spool directly)")
    if (
        config.context_parallel == "ring"
        and config.gpus_per_job > 1
        and config.attention_backend in (None, "native")
    ):
        raise ValueError(
            "--context-parallel ring merges partial attention by its log-sum-exp, which the native attention "
            "backend does not return: add --attention-backend _native_cudnn (or flash), or use ulysses"
        )
    from vera_engine.service.pool import LocalBackend, RunnerSpec, parse_devices
    from vera_engine.service.runner import PipelineRunner

    # Each worker resolves the model itself: 'default' or a folder at the same path on every node.
    runner = RunnerSpec(
        PipelineRunner,
        {
            "model": config.model,
            "memory": memory_options(config),
            "attention_backend": config.attention_backend,
            "compile_blocks": config.compile,
            "loras": parse_lora_arguments(config.lora),
        },
    )
    if config.devices:
        return LocalBackend(
            parse_devices(config.devices),
            runner,
            gpus_per_job=config.gpus_per_job,
            context_parallel=config.context_parallel,
            preview_interval=config.preview_interval,
        )
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError(
            "--cluster needs Ray: pip install -e '.[cluster]' in the Vera Edit checkout"
        ) from None
    from vera_engine.service.pool.ray_backend import RayBackend

    return RayBackend(
        config.cluster,
        runner,
        resource=config.worker_resource,
        gpus_per_job=config.gpus_per_job,
        context_parallel=config.context_parallel,
        shared_spool=config.shared_spool,
        preview_interval=config.preview_interval,
        allow_remote=config.allow_remote_ray,
    )


def run_serve(config: ServeConfig | argparse.Namespace) -> int:
    """Run the service until SIGINT/SIGTERM; returns the exit code (2 for bad options).

    `config` is a `ServeConfig`, or the flags `add_serve_parser`'s parser read (the `vera-engine serve` handler).
    Call it from the main thread: it installs the signal handlers that stop it.
    """
    import sys

    if isinstance(config, argparse.Namespace):
        from vera_engine.tools.config_cli import config_from_arguments

        config = config_from_arguments(ServeConfig, config)

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        auth.check_bind_policy(
            config.host, config.token_file, config.tls_cert, config.tls_key, config.insecure
        )
        tokens = auth.load_tokens(config.token_file) if config.token_file else []  # mode 0600, long tokens
        for root in config.allowed_roots:
            if not root.is_dir():
                raise auth.PolicyError(f"--allow-root {root}: not a folder")
        safe_files.DECODE.set_limit(safe_files.decode_budget_bytes(config.decode_memory))
        if config.queue_size < 1:
            raise auth.PolicyError(f"--queue-size {config.queue_size}: expected at least 1")
        from vera_engine.service.runner import PipelineRunner

        runner = PipelineRunner(
            config.model,
            device=config.device,
            memory=memory_options(config),
            attention_backend=config.attention_backend,
            compile_blocks=config.compile,
            loras=parse_lora_arguments(config.lora),
        )
        pool = pool_backend(config)
    except (auth.PolicyError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"vera-engine serve: error: {exc}", file=sys.stderr)
        return 2
    if config.insecure and not auth.is_loopback(config.host):
        log.warning("--insecure: %s accepts unauthenticated plain-text connections", config.host)
    try:
        engine = Engine(
            config.spool,
            runner,
            queue_capacity=config.queue_size,
            allowed_roots=config.allowed_roots,
            retention_seconds=config.retention_hours * 3600,
            preview_interval=config.preview_interval,
            pool=pool,
        )
    except SpoolInUse as exc:
        print(f"vera-engine serve: error: {exc}", file=sys.stderr)
        if pool is not None:
            pool.close()
        return 2
    tls = (config.tls_cert, config.tls_key) if config.tls_cert else None
    try:
        server, port = create_server(engine, config.host, config.port, tokens=tokens, tls=tls)
    except OSError as exc:
        print(f"vera-engine serve: error: {exc}", file=sys.stderr)
        engine.close()  # frees the spool and the pool's backend (its cluster connection)
        return 1
    with engine:  # starts the engine; closes it (the running job's step ends first) when serving stops
        server.start()
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        # A machine-readable line: tests and wrappers that pass --port 0 read the port from it.
        print(f"vera-engine listening on {config.host}:{port}", flush=True)
        done.wait()
        log.info("shutting down")
        server.stop(grace=5.0).wait()
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """``vera-engine serve`` as a standalone entry point."""
    parser = argparse.ArgumentParser(
        prog="vera-engine serve", description="Run the Vera Edit engine service."
    )
    _serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


def parse_lora_arguments(values: list[str] | None) -> dict[str, str]:
    """`--lora NAME=PATH` (repeatable) as {name: path} (training/lora.py checks the adapters themselves)."""
    from vera_engine.training.lora import parse_lora_arguments as parse

    return parse(values)
