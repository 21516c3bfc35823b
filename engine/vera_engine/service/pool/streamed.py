"""A job's files as a mapping whose bytes are read only when asked for, one file at a time.

Without ``--shared-spool`` a Ray worker gets a job's frames, and the front door its results, as bytes through
Ray's object store. Held as one ``dict[str, bytes]`` that is the whole job in memory, twice (on the front door and
on the worker) against the engine's bounded-memory promise. A :class:`LazyFiles` reads each file when it is
indexed (from disk, or ``ray.get`` of one object), so whoever walks it (``ray.put`` of each frame, writing each
file to disk) holds one file at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping


class LazyFiles(Mapping[str, bytes]):
    """File name -> bytes, each read by its own loader when indexed (never cached: walking it holds one file)."""

    def __init__(self, loaders: Mapping[str, Callable[[], bytes]]) -> None:
        self._loaders = dict(loaders)

    def __getitem__(self, name: str) -> bytes:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __repr__(self) -> str:
        return f"LazyFiles({sorted(self._loaders)})"
