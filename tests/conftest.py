"""Make the repository root importable (`import loss, model`) under plain `pytest` as well as `python -m pytest`,
and give every test the thread count the session started with."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def same_threads_for_every_test():
    """A test that changes torch's thread count (bench.py --threads 1 does) must not change the next
    test's: a float sum depends on how many threads split it, so tests that compare runs bit for bit
    would pass or fail with the order the tests ran in."""
    yield
    torch.set_num_threads(THREADS)
