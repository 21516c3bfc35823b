"""``vera-engine serve``: the command line that starts an engine process (arguments, model and memory options,
binding and security checks, signal handling); the service itself is in `engine.py` and `servicer.py`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

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


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        metavar="DIR|default",
        help="model folder, or 'default' (default: %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port, 0 = any free (default: %(default)s)"
    )
    parser.add_argument(
        "--spool", type=Path, required=True, metavar="DIR", help="folder for job inputs, results and state"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--lora",
        action="append",
        metavar="NAME=PATH",
        help="serve a LoRA adapter of --model (from `vera-engine train --lora`) as job option lora=NAME; repeatable",
    )
    perf = parser.add_argument_group("speed and memory (docs/BENCHMARKS.md has the figures)")
    perf.add_argument(
        "--attention-backend",
        metavar="NAME",
        help="diffusers attention backend for the joint attention: native, _native_cudnn, flash, _flash_3, sage "
        "(8-bit, approximate), ... (default: the one picked for the device, docs/GPU.md)",
    )
    perf.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the repeated MoT block (the first job compiles; default: on for CUDA without offloading)",
    )
    perf.add_argument(
        "--text-encoder-offload",
        choices=("none", "cpu", "swap"),
        default="none",
        help="cpu: the text encoder stays on the CPU and encodes there; swap: it visits the GPU only to encode "
        "(default: none)",
    )
    perf.add_argument(
        "--group-offload",
        type=int,
        metavar="BLOCKS",
        help="keep the transformer in CPU memory and bring BLOCKS MoT blocks at a time onto the device",
    )
    perf.add_argument(
        "--offload-to-disk", metavar="DIR", help="with --group-offload: page the blocks from files in DIR"
    )
    perf.add_argument(
        "--offload-stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --group-offload 1: prefetch the next block on a side stream (default: on for CUDA)",
    )
    perf.add_argument(
        "--model-cpu-offload", action="store_true", help="whole components visit the device one at a time"
    )
    perf.add_argument("--vae-tiling", action="store_true", help="encode and decode the Wan VAE in tiles")
    pool = parser.add_argument_group("several devices behind one engine (README: Scaling out)")
    pool.add_argument(
        "--devices",
        metavar="LIST",
        help="one worker process per device of this machine, e.g. cuda:0,cuda:1 (cpu may repeat: cpu,cpu)",
    )
    pool.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run jobs on Ray actors of a Ray cluster: auto, HEAD:6379 or ray://HEAD:10001 (needs the cluster extra: pip install -e '.[cluster]' in the checkout)",
    )
    pool.add_argument(
        "--gpus-per-job",
        type=int,
        default=1,
        metavar="N",
        help="devices per job, split by context parallelism (a Ray placement group on one node, or N of --devices) "
        "(default: %(default)s)",
    )
    pool.add_argument(
        "--context-parallel",
        choices=("ulysses", "ring"),
        default="ulysses",
        help="how a job over several devices splits attention (ring needs an --attention-backend that returns the "
        "log-sum-exp, e.g. _native_cudnn or flash) (default: %(default)s)",
    )
    pool.add_argument(
        "--shared-spool",
        action="store_true",
        help="with --cluster: the workers see --spool at the same path, so frames and results are not sent "
        "through Ray's object store",
    )
    pool.add_argument(
        "--allow-remote-ray",
        action="store_true",
        help="with --cluster ray://HOST:PORT: connect to a Ray Client server on another machine (secure the cluster "
        "first: RAY_AUTH_MODE=token, TLS, firewalled ports; docs/SECURITY.md)",
    )
    pool.add_argument(
        "--worker-resource",
        default="GPU",
        metavar="NAME",
        help="with --cluster: the Ray resource one worker takes per device: GPU, CPU (one worker per CPU) or a "
        "custom resource of the nodes; other than GPU, workers run on the CPU (default: %(default)s)",
    )
    parser.add_argument(
        "--allow-root",
        dest="allowed_roots",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="folder under which clients may send frames by path (repeatable; default: none)",
    )
    parser.add_argument(
        "--decode-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="memory all EXR decodes in flight may take together, uploads and jobs (default: 8 GiB, at most a "
        "quarter of this machine's memory); a frame needing more is refused",
    )
    parser.add_argument(
        "--queue-size", type=int, default=DEFAULT_QUEUE, help="jobs that may wait (default: %(default)s)"
    )
    parser.add_argument(
        "--retention-hours",
        type=float,
        default=DEFAULT_RETENTION_HOURS,
        help="keep finished jobs' results this long (default: %(default)s)",
    )
    parser.add_argument(
        "--preview-interval", type=float, default=1.0, help="seconds between previews (default: %(default)s)"
    )
    parser.add_argument(
        "--token-file", type=Path, metavar="FILE", help="file with accepted bearer tokens, one per line"
    )
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="PEM certificate chain for TLS")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="PEM private key for TLS")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback bind without token and TLS (not advised)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")


def memory_options(args: argparse.Namespace) -> MemoryOptions | None:
    """The serve flags as `vera_engine.acceleration.memory.MemoryOptions`, or None when none is given (all on the device)."""
    from vera_engine.acceleration.memory import MemoryOptions

    if args.group_offload is not None and args.group_offload < 1:
        raise ValueError(f"--group-offload {args.group_offload}: expected 1 or more MoT blocks at a time")
    if args.model_cpu_offload and (args.group_offload is not None or args.text_encoder_offload != "none"):
        raise ValueError(
            "--model-cpu-offload moves whole components itself: drop --group-offload / --text-encoder-offload"
        )
    if args.offload_to_disk and args.group_offload is None:
        raise ValueError("--offload-to-disk needs --group-offload BLOCKS")
    if args.offload_stream and args.group_offload is None:
        raise ValueError("--offload-stream needs --group-offload 1")
    options = MemoryOptions(
        text_encoder_offload=args.text_encoder_offload,
        group_offload="block" if args.group_offload is not None else None,
        num_blocks_per_group=args.group_offload if args.group_offload is not None else 1,
        use_stream=args.offload_stream,
        offload_to_disk=args.offload_to_disk,
        model_cpu_offload=args.model_cpu_offload,
        vae_tiling=args.vae_tiling,
    )
    return None if options == MemoryOptions() else options


def pool_backend(args: argparse.Namespace) -> PoolBackend | None:
    """The pool the flags ask for (`service.pool`), or None for one in-process worker on one device.

    Raises ValueError naming the flag for combinations that cannot work, and the Ray backend's ClusterError for a
    cluster that does not answer or has no worker resources.
    """
    if args.devices and args.cluster:
        raise ValueError("--devices and --cluster: choose one (local processes, or Ray actors)")
    if not (args.devices or args.cluster):
        if args.gpus_per_job != 1:
            raise ValueError(f"--gpus-per-job {args.gpus_per_job} needs --devices or --cluster")
        if args.shared_spool:
            raise ValueError("--shared-spool needs --cluster")
        return None
    if args.device is not None:
        raise ValueError(
            "--device picks one device; with --devices or --cluster the pool's workers pick theirs"
        )
    if args.shared_spool and not args.cluster:
        raise ValueError("--shared-spool needs --cluster (local workers always use the spool directly)")
    if (
        args.context_parallel == "ring"
        and args.gpus_per_job > 1
        and args.attention_backend in (None, "native")
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
            "model": args.model,
            "memory": memory_options(args),
            "attention_backend": args.attention_backend,
            "compile_blocks": args.compile,
            "loras": parse_lora_arguments(args.lora),
        },
    )
    if args.devices:
        return LocalBackend(
            parse_devices(args.devices),
            runner,
            gpus_per_job=args.gpus_per_job,
            context_parallel=args.context_parallel,
            preview_interval=args.preview_interval,
        )
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError(
            "--cluster needs Ray: pip install -e '.[cluster]' in the Vera Edit checkout"
        ) from None
    from vera_engine.service.pool.ray_backend import RayBackend

    return RayBackend(
        args.cluster,
        runner,
        resource=args.worker_resource,
        gpus_per_job=args.gpus_per_job,
        context_parallel=args.context_parallel,
        shared_spool=args.shared_spool,
        preview_interval=args.preview_interval,
        allow_remote=args.allow_remote_ray,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Run the service until SIGINT/SIGTERM; returns the exit code (2 for bad options)."""
    import sys

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        auth.check_bind_policy(args.host, args.token_file, args.tls_cert, args.tls_key, args.insecure)
        tokens = auth.load_tokens(args.token_file) if args.token_file else []  # mode 0600, long tokens
        for root in args.allowed_roots:
            if not root.is_dir():
                raise auth.PolicyError(f"--allow-root {root}: not a folder")
        safe_files.DECODE.set_limit(safe_files.decode_budget_bytes(args.decode_memory))
        if args.queue_size < 1:
            raise auth.PolicyError(f"--queue-size {args.queue_size}: expected at least 1")
        from vera_engine.service.runner import PipelineRunner

        runner = PipelineRunner(
            args.model,
            device=args.device,
            memory=memory_options(args),
            attention_backend=args.attention_backend,
            compile_blocks=args.compile,
            loras=parse_lora_arguments(args.lora),
        )
        pool = pool_backend(args)
    except (auth.PolicyError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"vera-engine serve: error: {exc}", file=sys.stderr)
        return 2
    if args.insecure and not auth.is_loopback(args.host):
        log.warning("--insecure: %s accepts unauthenticated plain-text connections", args.host)
    try:
        engine = Engine(
            args.spool,
            runner,
            queue_capacity=args.queue_size,
            allowed_roots=args.allowed_roots,
            retention_seconds=args.retention_hours * 3600,
            preview_interval=args.preview_interval,
            pool=pool,
        )
    except SpoolInUse as exc:
        print(f"vera-engine serve: error: {exc}", file=sys.stderr)
        if pool is not None:
            pool.close()
        return 2
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    try:
        server, port = create_server(engine, args.host, args.port, tokens=tokens, tls=tls)
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
        print(f"vera-engine listening on {args.host}:{port}", flush=True)
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
