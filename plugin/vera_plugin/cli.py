"""``vera``: the command line for TDs and farm scripts (needs only grpcio and protobuf).

Commands: ``vera info``, ``vera edit``, ``vera jobs``, ``vera cancel JOB``, ``vera fetch JOB --out DIR``.
Connection settings (the same for the Qt panel, the Nuke node and the Resolve window, see
:mod:`vera_plugin.connection`): ``--engine HOST:PORT`` or ``$VERA_ENGINE`` (default 127.0.0.1:50051);
``--token-file`` or ``$VERA_TOKEN_FILE``; ``--ca-cert`` or ``$VERA_CA_CERT`` (TLS); ``--tls`` or ``$VERA_TLS=1``
(TLS with the system's roots); ``--server-name`` or ``$VERA_SERVER_NAME``.

Exit codes (stable, for scripts):
  0  success (``vera cancel``: the job stopped, cancelled)
  1  the job failed on the engine, or another engine error
  2  bad arguments or local input (missing frames, bad frame range)
  3  the engine cannot be reached
  4  the engine rejected the request (INVALID_ARGUMENT: the message names the field; FAILED_PRECONDITION: the
     job is in the wrong state, e.g. ``vera cancel`` of a job that already ended)
  5  not authenticated (missing or wrong token)
  6  the engine's queue is full (RESOURCE_EXHAUSTED "queue is full"): retry later
  7  no such job
  8  the job was cancelled (``vera edit``, ``vera fetch``)
  130 interrupted (Ctrl-C); ``vera edit`` cancels its job first unless --detach
  141 stdout was closed early (e.g. ``vera jobs | head``), as for any command killed by SIGPIPE
Results go to stdout (one output file per line, or JSON with --json); progress and errors to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from google.protobuf import json_format

from vera_plugin.client import (
    FINAL_STATES,
    EngineClient,
    EngineError,
    parse_frames,
    sequence_files,
    state_name,
)
from vera_plugin.connection import DEFAULT_ADDRESS, ConnectionSettings, connection_settings
from vera_plugin.generate import GenerateCancelled, GenerateError, follow_job, status_text
from vera_proto.vera.v1 import engine_pb2 as pb

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REJECTED = 4
EXIT_UNAUTHENTICATED = 5
EXIT_BUSY = 6
EXIT_NOT_FOUND = 7
EXIT_CANCELLED = 8
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away

_CODE_EXITS = {
    "UNAVAILABLE": EXIT_UNREACHABLE,
    "DEADLINE_EXCEEDED": EXIT_UNREACHABLE,
    "INVALID_ARGUMENT": EXIT_REJECTED,
    "FAILED_PRECONDITION": EXIT_REJECTED,
    "OUT_OF_RANGE": EXIT_REJECTED,
    "UNAUTHENTICATED": EXIT_UNAUTHENTICATED,
    "PERMISSION_DENIED": EXIT_UNAUTHENTICATED,
    # RESOURCE_EXHAUSTED is also gRPC's answer to a message over a size limit: retrying unchanged cannot help.
    "RESOURCE_EXHAUSTED": EXIT_BUSY,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "CANCELLED": EXIT_CANCELLED,
}


def exit_code_for(error: EngineError) -> int:
    """The exit code for an engine error (see the module docstring)."""
    if error.code == "RESOURCE_EXHAUSTED" and "queue is full" not in error.details:
        return EXIT_JOB_FAILED  # a gRPC size limit, not a busy engine: exit 6 would tell a script to retry
    return _CODE_EXITS.get(error.code, EXIT_JOB_FAILED)


def _settings(args: argparse.Namespace) -> ConnectionSettings:
    """The connection settings: the flags given, else the environment (one rule for every client)."""
    return connection_settings(
        args.engine,
        token_file=args.token_file,
        ca_cert=args.ca_cert,
        tls=True if args.tls else None,
        server_name=args.server_name,
    )


def _connect(args: argparse.Namespace) -> EngineClient:
    return _settings(args).connect(timeout=args.timeout)


def _json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# ---------------------------------------------------------------------------------------------------------
# Progress display


class _NoSink:
    # vera edit shows progress from each status (Progress.update) and cancels on Ctrl-C itself.
    def update(self, fraction: float, message: str) -> None:
        pass

    def cancelled(self) -> bool:
        return False


_NO_SINK = _NoSink()


def _bar(fraction: float, width: int = 30) -> str:
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


class Progress:
    """A one-line progress bar on a terminal; one line per change of stage otherwise (logs stay readable).

    ``clock``: seconds, monotonic (tests pass their own). The engine's ETA counts sampling steps; through the
    writing stage (big plates are written at a frame or less a second) the ETA comes from how fast the job's
    progress has moved since writing began.
    """

    def __init__(
        self, stream: TextIO, quiet: bool = False, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self.clock = clock
        self._last_line = ""
        self._last_key: tuple[Any, ...] = ()
        self._stage_start: tuple[int, float, float] | None = None  # (stage, time, progress) when it began

    def _eta(self, status: pb.JobStatus) -> float | None:
        if status.state != pb.JOB_STATE_RUNNING:
            return None
        now = self.clock()
        if self._stage_start is None or self._stage_start[0] != status.stage:
            self._stage_start = (status.stage, now, status.progress)
        if status.stage == pb.STAGE_SAMPLING:
            return status.eta_seconds if status.HasField("eta_seconds") else None
        _stage, since, progress_then = self._stage_start
        moved, elapsed = status.progress - progress_then, now - since
        if moved <= 0 or elapsed <= 0:
            return None  # not measured yet: no ETA rather than a wrong one
        return (1.0 - status.progress) * elapsed / moved

    def update(self, status: pb.JobStatus) -> None:
        """Show one JobStatus."""
        if self.quiet:
            return
        # The hosts' one status sentence (vera_plugin.generate.status_text) after the state, without the engine's
        # ETA: that counts sampling steps only, so the bar shows its own (see _eta).
        without_eta = pb.JobStatus()
        without_eta.CopyFrom(status)
        without_eta.ClearField("eta_seconds")
        state, detail = state_name(status.state), status_text(without_eta)
        parts = [f"{_bar(status.progress)} {status.progress * 100:5.1f}%", state] + (
            [detail] if detail != state else []
        )
        eta = self._eta(status)
        if eta is not None:
            parts.append(f"ETA {eta:.0f}s")
        self._show(
            "  ".join(parts), (status.state, status.stage_detail.split(":")[0], int(status.progress * 10))
        )

    def upload(self, frames_sent: int, frames_total: int, bytes_sent: int, bytes_total: int) -> None:
        """Show how much of the upload has gone (``EngineClient.submit_files``'s ``progress``)."""
        if self.quiet:
            return
        fraction = bytes_sent / bytes_total if bytes_total else frames_sent / max(frames_total, 1)
        line = f"{_bar(fraction)} {fraction * 100:5.1f}%  uploading  {frames_sent}/{frames_total} files"
        if bytes_total:
            line += f", {_size(bytes_sent)} of {_size(bytes_total)}"
        self._show(line, ("upload", int(fraction * 10)))

    def _show(self, line: str, key: tuple[Any, ...]) -> None:
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self._last_line)))
            self.stream.flush()
            self._last_line = line
        else:
            # Without a terminal: a line per state/stage change and per 10 % of progress.
            if key != self._last_key:
                self._last_key = key
                print(line, file=self.stream, flush=True)

    def done(self) -> None:
        """End the progress line."""
        if self.tty and self._last_line and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()
        self._last_line = ""


# ---------------------------------------------------------------------------------------------------------
# Commands


def cmd_info(args: argparse.Namespace) -> int:
    """Print the engine's version, device, queue and models with their options."""
    settings = _settings(args)
    with _connect(args) as client:
        info = client.info()
    if args.json:
        print(json.dumps(_json(info), indent=2))
        return EXIT_OK
    gib = 1024**3
    dev = info.device
    free, total = (
        pool_memory(info.workers) if info.workers else (dev.memory_free_bytes, dev.memory_total_bytes)
    )
    print(f"engine   {settings.describe()}  version {info.engine_version}")
    print(
        f"device   {dev.name} ({dev.kind or 'no device yet'}), {free / gib:.1f} of {total / gib:.1f} GiB free"
    )
    print(f"queue    {info.queue_length} waiting of {info.queue_capacity}, {info.running} running")
    print(f"model    {'loaded' if info.model_loaded else 'loading'}")
    limits = info.limits
    print(
        f"limits   {limits.max_frames} frames of {limits.min_side}..{limits.max_side} px a side, "
        f"{limits.max_frame_bytes / gib:g} GiB a frame; prompt {limits.max_prompt_chars} characters, "
        f"name {limits.max_label_chars}; seed {limits.seed_min}..{limits.seed_max}; "
        f"half results hold +-{limits.max_half_value:g}"
    )
    # One worker for a single-device engine; a pool's every worker, where it is, what it runs.
    for worker in info.workers:
        print(f"worker   {worker_line(worker)}")
    for model in info.models:
        default = " (default)" if model.is_default else ""
        print(
            f"  {model.name}{default}: native {model.native_width}x{model.native_height}, "
            f"{model.frame_window} frames, tasks {', '.join(model.tasks)}"
        )
        if model.vocabulary:
            # A word-level model reads only these words; any other is read as unknown (the edit still runs).
            print(f"    words it reads ({len(model.vocabulary)}): {' '.join(model.vocabulary)}")
        for opt in model.options:
            value = opt.default.WhichOneof("value")
            default_text = f" = {getattr(opt.default, value)!r}" if value else ""
            limits = ""
            if opt.choices:
                limits = f" one of {', '.join(opt.choices)}"
            elif opt.HasField("min") or opt.HasField("max"):
                limits = f" in {opt.min:g}..{opt.max:g}"
            kind = pb.OptionType.Name(opt.type).removeprefix("OPTION_TYPE_").lower()
            print(f"    {opt.name} ({kind}){default_text}{limits}: {opt.help}")
    return EXIT_OK


def pool_memory(workers: Sequence[pb.WorkerInfo]) -> tuple[int, int]:
    """(free, total) bytes of a pool's devices, each counted once: CPU workers on one node share its memory
    (each reports the whole machine's), while each GPU worker holds a GPU of its own. Workers still starting
    (no device reported yet) and lost ones count nothing."""
    seen: set[tuple[str, str]] = set()
    free = total = 0
    for worker in workers:
        device = worker.device
        if worker.state == pb.WORKER_STATE_LOST or not device.memory_total_bytes:
            continue
        if device.kind == "cpu":
            if (worker.node, "cpu") in seen:
                continue
            seen.add((worker.node, "cpu"))
        free += device.memory_free_bytes
        total += device.memory_total_bytes
    return free, total


def worker_line(worker: pb.WorkerInfo) -> str:
    """One worker as `vera info` shows it; a worker still loading has no node or device to show yet."""
    state = pb.WorkerState.Name(worker.state).removeprefix("WORKER_STATE_").lower()
    if not worker.node and not worker.device.name:
        return f"{worker.name}: {state} (no node or device reported yet)"
    devices = f" x{worker.devices}" if worker.devices else ""
    where = f" on {worker.node}" if worker.node else ""
    parts = [f"{worker.device.name or 'device not reported'}{devices}"]
    if worker.model:
        parts.append(worker.model)
    parts.append(state + (f" {worker.job_id}" if worker.job_id else ""))
    return f"{worker.name}{where}: {', '.join(parts)}"


def _status_line(status: pb.JobStatus) -> str:
    header = status.header
    frames = f"{header.frames[0]}-{header.frames[-1]}" if header.frames else "-"
    progress = f"{status.progress * 100:3.0f}%"
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.created_at))
    error = f"  {status.error}" if status.error else ""
    return (
        f"{status.job_id}  {state_name(status.state):<9}  {progress}  {created}  {frames:<11}  "
        f"{header.task:<17}  {header.prompt[:40]!r}{error}"
    )


def cmd_jobs(args: argparse.Namespace) -> int:
    """List the engine's jobs."""
    with _connect(args) as client:
        jobs = client.list_jobs(states=args.state or (), limit=args.limit)
    if args.json:
        print(json.dumps([_json(j) for j in jobs], indent=2))
    else:
        for status in jobs:
            print(_status_line(status))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a job and wait until it has stopped; prints the job and its final state.

    A running job stops within one denoising step; the engine may answer before that (RUNNING with the cancel
    requested), so the command follows the job to its final state rather than report a state in between.
    """
    with _connect(args) as client:
        status = client.cancel(args.job)
        if status.state not in FINAL_STATES:
            if not args.quiet:
                print(f"vera cancel: cancel requested; waiting for job {args.job} to stop", file=sys.stderr)
            status = client.wait(args.job)
    print(f"{status.job_id} {state_name(status.state)}")
    if status.state == pb.JOB_STATE_CANCELLED:
        return EXIT_OK
    print(
        f"vera cancel: job {args.job} {state_name(status.state)} before the cancel took effect",
        file=sys.stderr,
    )
    return EXIT_REJECTED


def _fetch(client: EngineClient, job: str, out: str, quiet: bool) -> list[str]:
    def progress(index: int, count: int, name: str) -> None:
        if not quiet:
            print(f"fetched {index}/{count} {name}", file=sys.stderr, flush=True)

    return [str(p) for p in client.fetch(job, out, progress=progress)]


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download a finished job's results; a cancelled job exits 8 and a failed one 1, like ``vera edit``."""
    with _connect(args) as client:
        try:
            files = _fetch(client, args.job, args.out, args.quiet)
        except EngineError as exc:
            if exc.code != "FAILED_PRECONDITION":
                raise
            status = client.status(args.job)
            if status.state == pb.JOB_STATE_CANCELLED:
                print(f"vera fetch: job {args.job} was cancelled; it has no results", file=sys.stderr)
                return EXIT_CANCELLED
            if status.state == pb.JOB_STATE_FAILED:
                print(f"vera fetch: job {args.job} failed: {status.error}", file=sys.stderr)
                return EXIT_JOB_FAILED
            raise
    for path in files:
        print(path)
    return EXIT_OK


def cmd_edit(args: argparse.Namespace) -> int:
    """Submit a plate, follow the job with a progress bar, fetch the results into --out."""
    try:
        frames = parse_frames(args.frames)
    except ValueError as exc:
        print(f"vera edit: error: --frames: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = {
        "task": args.task,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "step_cache": args.step_cache,
        "colorspace": args.colorspace,
        "bit_depth": args.bit_depth,
        "compression": args.compression,
        "model": args.model,
        "name": args.name,
        "hdr": args.hdr or None,
        "takes": args.takes,
        "window_frames": args.window,
        "window_overlap": args.overlap,
        "lora": args.lora,
        "lora_scale": args.lora_scale,
        "clip_black": args.clip_black,
        "clip_white": args.clip_white,
    }
    progress = Progress(sys.stderr, quiet=args.quiet)
    try:  # every frame present before anything is said about uploading them
        plate = sequence_files(args.plate, frames, "plate")
        mask = sequence_files(args.mask, frames, "mask") if args.mask else None
    except (FileNotFoundError, ValueError) as exc:
        print(f"vera edit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    address = _settings(args).address
    with _connect(args) as client:
        if not args.quiet:
            print(f"uploading {len(frames)} frames to {address} ...", file=sys.stderr, flush=True)
        try:
            job = client.submit_files(
                plate,
                frames,
                prompt=args.prompt,
                mask=mask,
                send_paths=args.send_paths,
                progress=progress.upload,
                **options,
            )
        except (FileNotFoundError, ValueError) as exc:
            progress.done()
            print(f"vera edit: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        progress.done()
        if not args.quiet:
            print(f"job {job}", file=sys.stderr, flush=True)
        if args.detach:
            print(job)
            return EXIT_OK
        try:  # the hosts' one follow path and its sentences (vera_plugin.generate)
            final = follow_job(client, job, _NO_SINK, on_status=progress.update)
        except KeyboardInterrupt:
            progress.done()
            print(f"vera edit: interrupted; cancelling job {job}", file=sys.stderr)
            client.cancel(job, ended_ok=True)
            return EXIT_INTERRUPTED
        except GenerateCancelled as exc:
            progress.done()
            print(f"vera edit: {exc}", file=sys.stderr)
            return EXIT_CANCELLED
        except GenerateError as exc:
            progress.done()
            print(f"vera edit: {exc}", file=sys.stderr)
            return EXIT_JOB_FAILED
        assert final is not None  # no stop() given
        progress.done()
        files = _fetch(client, job, args.out, args.quiet)
    if args.json:
        print(json.dumps({"job_id": job, "seed": final.seed, "files": files}))
    else:
        for path in files:
            print(path)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    """The ``vera`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("engine connection")
    group.add_argument(
        "--engine",
        metavar="HOST:PORT",
        help=f"engine address (default: $VERA_ENGINE, else {DEFAULT_ADDRESS})",
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the engine's bearer token (default: $VERA_TOKEN_FILE)",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, verifying the engine against the system's roots unless --ca-cert ($VERA_TLS=1)",
    )
    group.add_argument(
        "--ca-cert",
        metavar="PEM",
        help="the engine's certificate, or its CA, to verify it with; turns TLS on (default: $VERA_CA_CERT)",
    )
    group.add_argument(
        "--server-name",
        help="the name the engine's TLS certificate holds, if not the address's host (default: $VERA_SERVER_NAME)",
    )
    group.add_argument(
        "--timeout", type=float, default=30.0, help="seconds for short calls (default: %(default)s)"
    )
    group.add_argument("--quiet", "-q", action="store_true", help="no progress output")

    parser = argparse.ArgumentParser(
        prog="vera",
        description="Talk to a Vera Edit engine: submit plates, follow jobs, fetch layered EXRs.",
        epilog="Exit codes" + (__doc__ or "Exit codes").split("Exit codes", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vera {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", parents=[common], help="engine, device, queue, models and their options")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    edit = sub.add_parser("edit", parents=[common], help="edit a plate and fetch the layered result")
    edit.add_argument("--plate", required=True, help="EXR sequence, e.g. /shots/sh010/plate.####.exr")
    edit.add_argument(
        "--frames",
        required=True,
        metavar="A-B",
        help="frame range, e.g. 1001-1100, 1,3,5-9 or -2-1 (frames -2 to 1)",
    )
    edit.add_argument(
        "--mask",
        metavar="SEQUENCE",
        help="optional mask sequence, same frames (one channel, or its A channel): white (1) is the region the edit "
        "may change, black (0) is kept. object_addition: where the object (and its shadow) may go; "
        "background_change: the background to replace, i.e. everything but the subject (a roto of the subject "
        "goes in inverted)",
    )
    edit.add_argument("--prompt", required=True, help="the edit, e.g. 'add a sea turtle swimming left'")
    edit.add_argument("--negative-prompt", help="what the result should not contain")
    edit.add_argument(
        "--task", choices=("object_addition", "background_change"), help="default: object_addition"
    )
    edit.add_argument("--seed", type=int, help="default: random (reported)")
    edit.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    edit.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    edit.add_argument(
        "--step-cache",
        help="opt-in approximate speed-up, one of the model's step_cache choices (`vera info`), e.g. taylorseer:2",
    )
    edit.add_argument(
        "--takes",
        type=int,
        help="variations in one job (seeds seed..seed+N-1; default 1): take k comes back as vera_edit_take<k>.####.exr",
    )
    edit.add_argument(
        "--window",
        type=int,
        help="frames per sampling window for clips longer than it (default: the model's; 0: one pass)",
    )
    edit.add_argument(
        "--overlap", type=int, help="frames neighbouring windows share (default: a quarter window)"
    )
    edit.add_argument("--colorspace", help="the plate's scene-linear colour space (default: ACEScg)")
    edit.add_argument(
        "--hdr", action="store_true", help="keep highlights through the ACES SDR view transform"
    )
    edit.add_argument("--bit-depth", choices=("half", "float"), help="output EXR bit depth (default: half)")
    edit.add_argument("--compression", help="output EXR compression (default: zip)")
    edit.add_argument("--model", help="model name (default: the engine's default)")
    edit.add_argument(
        "--lora", help="a LoRA adapter the engine serves for the model (`vera info` lists them)"
    )
    edit.add_argument("--lora-scale", type=float, help="adapter strength, 0..2 (default: 1)")
    edit.add_argument(
        "--clip-black",
        type=float,
        help="matte values at or below this become exactly 0: the plate kept bit for bit there (default: the "
        "model's, 0.05)",
    )
    edit.add_argument(
        "--clip-white",
        type=float,
        help="matte values at or above this become exactly 1 (default: the model's, 0.95)",
    )
    edit.add_argument("--name", help="label shown in job lists (e.g. the shot)")
    edit.add_argument(
        "--send-paths",
        action="store_true",
        help="send file paths instead of bytes (engine shares the storage)",
    )
    edit.add_argument("--detach", action="store_true", help="print the job id after upload and exit")
    edit.add_argument("--json", action="store_true", help="print {job_id, seed, files} as JSON")
    edit.add_argument("--out", required=True, help="folder for vera_edit.####.exr")
    edit.set_defaults(func=cmd_edit)

    jobs = sub.add_parser("jobs", parents=[common], help="list the engine's jobs")
    jobs.add_argument(
        "--state",
        action="append",
        choices=("queued", "running", "succeeded", "failed", "cancelled"),
        help="only jobs in this state (repeatable)",
    )
    jobs.add_argument("--limit", type=int, default=0, help="only the newest N jobs")
    jobs.add_argument("--json", action="store_true", help="print JSON")
    jobs.set_defaults(func=cmd_jobs)

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job", help="job id")
    cancel.set_defaults(func=cmd_cancel)

    fetch = sub.add_parser("fetch", parents=[common], help="download a finished job's results")
    fetch.add_argument("job", help="job id")
    fetch.add_argument("--out", required=True, help="folder to write the results to")
    fetch.set_defaults(func=cmd_fetch)

    panel = sub.add_parser(
        "panel",
        add_help=False,
        help="the Vera Edit Qt panel, standalone (needs PySide6: the 'ui' extra); `vera panel --help`",
    )
    panel.set_defaults(func=lambda args: cmd_panel([]))
    return parser


def cmd_panel(argv: Sequence[str]) -> int:
    """`vera panel`: the standalone panel; its own options are parsed by `vera_plugin.panel.main`."""
    try:
        from vera_plugin.panel import main as panel_main
    except ImportError as exc:
        print(
            f"vera panel: error: {exc}; install PySide6 (from a checkout: pip install -e '.[ui]'; "
            "or pip install PySide6-Essentials)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return panel_main(list(argv))


def _version() -> str:
    """The installed vera-edit's version, else (run from a checkout) the engine package's."""
    from importlib import metadata

    try:
        return metadata.version("vera-edit")
    except metadata.PackageNotFoundError:
        try:
            from vera_engine import __version__
        except ImportError:
            return "unknown (not installed)"
        return str(__version__)


def _attach_negative_values(argv: list[str], options: Sequence[str] = ("--frames",)) -> list[str]:
    """``--frames -2-1`` -> ``--frames=-2-1``: argparse takes a value starting with ``-`` that is not a plain
    negative number for an option, so a frame range from a negative frame needs the ``=`` form; this adds it."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if (
            arg in options
            and index + 1 < len(argv)
            and argv[index + 1][:1] == "-"
            and argv[index + 1][1:2].isdigit()
        ):
            out.append(f"{arg}={argv[index + 1]}")
            index += 2
            continue
        out.append(arg)
        index += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vera``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["panel"]:
        # The panel parses its own options (--engine, --cache, --screenshot, ...).
        return cmd_panel(argv[1:])
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(argv))
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`vera jobs | head`): no traceback, and nothing more to write. Point stdout at
        # /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except EngineError as exc:
        print(f"vera {args.command}: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except (OSError, ValueError) as exc:
        print(f"vera {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"vera {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
