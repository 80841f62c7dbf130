import os
import sys
from pathlib import Path

import torch

# Tiny models gain nothing from a second thread, and several test processes on a 2-core machine
# (or a busy CI box) slow down badly when each spins two OpenMP threads.
torch.set_num_threads(int(os.environ.get("TUNELAB_TEST_THREADS", "1")))
sys.path.insert(0, str(Path(__file__).parent))  # tests import method_harness
