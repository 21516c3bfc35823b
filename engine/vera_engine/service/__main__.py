"""``python -m vera_engine.service [serve options]``: runs the engine service (same as ``vera-engine serve``)."""

import sys

from vera_engine.service.serve import serve_main

if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
