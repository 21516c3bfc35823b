"""Issue 28 item 10: a preview the engine lies about (12 bytes declared 4096x4096) must not crash the panel (it
docks inside Nuke). Run in a child process: before the check, QImage read past the buffer and the process died."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("PySide6.QtWidgets")
pytestmark = pytest.mark.timeout(120)

_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6 import QtWidgets
    app = QtWidgets.QApplication([])
    from vera_plugin.panel import VeraPanel
    from vera_proto.vera.v1 import engine_pb2 as pb
    panel = VeraPanel(connect=False, cache=sys.argv[1])
    for width, height, data in ((4096, 4096, bytes(12)), (70000, 1, bytes(210000)), (2, 2, bytes(12))):
        panel._show_preview(pb.Preview(width=width, height=height, rgb8=data, frame=1001, step=2))
        print(panel.preview_caption.text(), flush=True)
    """
)


def test_a_preview_shorter_than_its_size_is_refused_not_drawn(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=90, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    refused, too_wide, good = done.stdout.strip().splitlines()
    assert refused == "preview refused: 12 bytes for a 4096x4096 RGB8 picture; expected 50331648"
    assert too_wide.startswith("preview refused: 70000x1 is outside 1..4096 pixels a side")
    assert good == "frame 1001, step 2"
