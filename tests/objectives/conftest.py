import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tests run thousands of tiny ops; with two OpenMP threads on a loaded two-core machine
    each parallel op can wait milliseconds at a barrier, so run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
