import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Each test starts from seed 0 on one CPU thread (small tests slow down many times when
    threads compete on a shared 2-core machine); the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
