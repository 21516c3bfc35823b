"""``python -m vera_engine ...`` is ``vera-engine ...`` (also under ``torchrun -m vera_engine train``)."""

import sys

from vera_engine.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
