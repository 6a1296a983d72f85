"""Make the repository root importable (`import loss, model`) under plain `pytest` as well as `python -m pytest`,
run the tests on the CPU unless CARP_DEVICE says otherwise, give every test the thread count the session
started with, and close the progress bars a test left open."""
import os
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The device every script picks (distributed.device_type) is CUDA where a GPU is visible; the tests' numbers
# and their two-process runs (gloo, one process per core) are the CPU's, so the suite runs on the CPU on any
# machine. `CARP_DEVICE=cuda python -m pytest ...` runs the tests that use the training device on the GPU
# (bench.py --sections cuda_tests does); the scripts that tests start inherit the choice.
os.environ.setdefault("CARP_DEVICE", "cpu")

THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def same_threads_for_every_test():
    """A test that changes torch's thread count (bench.py --threads 1 does) must not change the next
    test's: a float sum depends on how many threads split it, so tests that compare runs bit for bit
    would pass or fail with the order the tests ran in."""
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def no_progress_bar_left_open():
    """A bar left open by a test that failed inside a training loop would make the next tests' bars
    print cursor movements before their lines: the one-line messages that those tests read from
    stderr would no longer start the line, and one failure would show as several."""
    yield
    for bar in list(tqdm._instances):
        bar.close()
