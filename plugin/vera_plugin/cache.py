"""Where a host keeps a job's results, and how a reopened script finds them again without regenerating.

Layout: ``<cache root>/<job id>/vera_edit.<frame>.exr`` for take 1 and ``vera_edit_take<k>.<frame>.exr`` for take
``k > 1`` (the engine's names, ``JobStatus.output_files`` in ``engine.proto``). The cache root is ``$VERA_CACHE``
when set, else a ``vera_cache/<script name>`` folder beside the saved script, else (unsaved script) the user's
own cache folder (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%``
on Windows): never the shared temp folder, where another user could plant a link or read the results.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RESULT_PREFIX",
    "CachedResult",
    "cache_root",
    "find_results",
    "find_takes",
    "job_dir",
    "result_prefix",
    "safe_name",
    "take_and_frame",
]

RESULT_PREFIX = "vera_edit"
_RESULT = re.compile(rf"{RESULT_PREFIX}(?:_take(\d+))?\.(-?\d+)\.exr")
_JOB_ID = re.compile(r"[A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """``text`` reduced to characters that are safe in a file or node name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "untitled"


def cache_root(script_path: str = "", env: Mapping[str, str] | None = None) -> Path:
    """The folder results are cached under for a script saved at ``script_path`` (``""``: unsaved)."""
    env = os.environ if env is None else env
    if env.get("VERA_CACHE"):
        return Path(env["VERA_CACHE"]).expanduser()
    if script_path:
        script = Path(script_path)
        return script.parent / "vera_cache" / safe_name(script.stem)
    return user_cache_dir(env) / "vera_cache" / "untitled"


def user_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """This user's own cache folder (the platform's convention), which other users cannot write to."""
    env = os.environ if env is None else env
    if sys.platform == "win32":
        return Path(env.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def result_prefix(take: int = 1) -> str:
    """The file-name prefix of take ``take``: ``vera_edit`` for take 1, ``vera_edit_take<k>`` after."""
    if take < 1:
        raise ValueError(f"take {take}: takes are numbered from 1")
    return RESULT_PREFIX if take == 1 else f"{RESULT_PREFIX}_take{take}"


def take_and_frame(name: str) -> tuple[int, int] | None:
    """``(take, frame)`` of a result file name (``vera_edit_take2.1001.exr`` -> ``(2, 1001)``), else ``None``."""
    match = _RESULT.fullmatch(name)
    return (int(match.group(1) or 1), int(match.group(2))) if match else None


def job_dir(root: str | os.PathLike[str], job_id: str) -> Path:
    """The folder of one job's results under ``root``."""
    if not _JOB_ID.fullmatch(job_id) or job_id in (".", ".."):
        raise ValueError(f"job id {job_id!r} is not a plain name; expected letters, digits, '-', '_' or '.'")
    return Path(root) / job_id


@dataclass(frozen=True)
class CachedResult:
    """One take of a job's results on disk: the folder, the frame numbers found, a host-style sequence pattern."""

    folder: Path
    frames: tuple[int, ...]
    padding: int
    take: int = 1

    @property
    def pattern(self) -> str:
        """``<folder>/vera_edit.####.exr`` (``vera_edit_take<k>`` for take k; as many ``#`` as the files'
        padding), forward slashes for Nuke."""
        return (self.folder / f"{result_prefix(self.take)}.{'#' * self.padding}.exr").as_posix()

    @property
    def first(self) -> int:
        """First frame."""
        return self.frames[0]

    @property
    def last(self) -> int:
        """Last frame."""
        return self.frames[-1]


def find_takes(root: str | os.PathLike[str], job_id: str) -> dict[int, CachedResult]:
    """Every take of ``job_id`` cached under ``root``, by take number (empty when there are none)."""
    if not job_id:
        return {}
    folder = job_dir(root, job_id)
    if not folder.is_dir():
        return {}
    frames: dict[int, list[int]] = {}
    padding: dict[int, int] = {}
    for entry in folder.iterdir():
        match = _RESULT.fullmatch(entry.name)
        if match and entry.is_file():
            take = int(match.group(1) or 1)
            frames.setdefault(take, []).append(int(match.group(2)))
            digits = match.group(2).lstrip("-")
            # An unpadded long number (10001 with ####) says nothing about padding; take the shortest.
            padding[take] = min(padding.get(take, len(digits)), len(digits))
    return {
        take: CachedResult(folder=folder, frames=tuple(sorted(found)), padding=padding[take], take=take)
        for take, found in sorted(frames.items())
    }


def find_results(root: str | os.PathLike[str], job_id: str, take: int = 1) -> CachedResult | None:
    """Take ``take`` of ``job_id``'s cached results under ``root``, or ``None`` when there are none."""
    return find_takes(root, job_id).get(take)
