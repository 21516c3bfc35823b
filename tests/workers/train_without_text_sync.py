"""`vera-engine train` with the text encoder's gradient averaging switched off: run under `torchrun
--nproc-per-node 2` to show that a run whose replicas drift apart stops at its first save instead of saving one
process's weights as the run's."""

import sys

from vera_engine.tools.cli import main
from vera_engine.training import train

train._Distributed.average_gradients = lambda self, parameters: None  # the bug this guards against
sys.exit(main(sys.argv[1:]))
