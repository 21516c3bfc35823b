"""Every limit Submit and ListJobs enforce, in one place, and how error messages quote what a client sent.

The numbers are published to clients as ``EngineInfo.limits`` (:func:`limits_message`), so a host can check a
job before it uploads anything; the checks in `schema.py` and `spool.py` read the same constants.
"""

from __future__ import annotations

import re

from vera_proto.vera.v1 import engine_pb2 as pb

MAX_FRAMES = 10000  # plate frames per job
MIN_SIDE = 16  # pixels, width and height of every frame
MAX_SIDE = 16384
MAX_FRAME_BYTES = 2 * 1024**3  # one frame as sent: a 16K float32 RGBA frame is 4 GiB, nobody sends that whole
MAX_PROMPT_CHARS = 2000  # prompt and negative_prompt
MAX_LABEL_CHARS = 256  # name and submitted_by
MAX_PATH_CHARS = 4096  # an ENCODING_PATH path (Linux's PATH_MAX)
MAX_CHOICE_CHARS = 64  # task, model, colorspace, bit_depth, compression, step_cache
# Seeds travel in OptionSpec.min/max as doubles: 2^53 - 1 is the largest integer a double holds exactly.
SEED_MIN = 0
SEED_MAX = 2**53 - 1
MAX_TAKES = 8  # variations per job (JobHeader.takes), each a full set of layers
MAX_PAGE_SIZE = 100  # ListJobs jobs per reply
# A ListJobs reply stops adding jobs past this many bytes: one job is at most ~0.4 MB (10,000 frame numbers and
# output names, prompts at their limit), so a reply stays well under gRPC's default 4 MiB receive limit.
PAGE_BYTES = 1024 * 1024
MAX_HALF_VALUE = 65504.0  # the largest finite half float: a larger value is infinity in a half-float EXR

MAX_ERROR_CHARS = 2000  # a failed job's stored error (exception texts can be any length)
MAX_MESSAGE_BYTES = 1000  # an RPC's error message: gRPC sends it as metadata, whose size is limited
QUOTE_CHARS = 40  # the prefix of a client's value that an error message repeats


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """A short, escaped rendering of a value a client sent, for error messages.

    Strings longer than ``limit`` characters are cut, and the message says how long they were: repeating a
    20,000-character value would push the reply's metadata over gRPC's limit.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def cap_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut to at most ``limit`` UTF-8 bytes (marked with "..."), the last guard before a reply."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


# An absolute path inside an exception's text: POSIX (/srv/spool/jobs/...) or Windows (C:\\spool\\...).
_SERVER_PATH = re.compile(r"""(?<![\w.~])(?:[A-Za-z]:[\\/]|/)[^\s'"`:,;()\[\]{}<>]*""")


def job_error(exc: BaseException) -> str:
    """What a client is told of an unexpected failure: the exception's type and text, with every absolute path
    in it replaced by ``<path>``.

    A job's error goes to every client (``JobStatus.error``); the engine's own paths (spool, model cache, home
    folder) are the operator's business. The whole exception, paths and traceback, goes to the engine's log.
    """
    text = _SERVER_PATH.sub("<path>", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def limits_message() -> pb.Limits:
    """The limits as GetInfo publishes them."""
    return pb.Limits(
        max_frames=MAX_FRAMES,
        min_side=MIN_SIDE,
        max_side=MAX_SIDE,
        max_frame_bytes=MAX_FRAME_BYTES,
        max_prompt_chars=MAX_PROMPT_CHARS,
        max_label_chars=MAX_LABEL_CHARS,
        max_path_chars=MAX_PATH_CHARS,
        max_choice_chars=MAX_CHOICE_CHARS,
        seed_min=SEED_MIN,
        seed_max=SEED_MAX,
        max_takes=MAX_TAKES,
        max_page_size=MAX_PAGE_SIZE,
        max_half_value=MAX_HALF_VALUE,
    )
