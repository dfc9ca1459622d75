import os
import shutil
import tempfile

import pytest
import torch


def pytest_configure(config):
    """A fresh torch.compile cache for this run (and the processes it spawns), unless the caller
    chose one: inductor's shared cache under the temp folder outlives runs, and a kernel cached
    by a run with another ATEN_CPU_CAPABILITY (or half-written by a run beside this one) aborted
    the compiled-solver tests of the next run (SIGABRT inside the cached kernel)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        config._inductor_cache = tempfile.mkdtemp(prefix="ctrl_csc_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = config._inductor_cache


def pytest_unconfigure(config):
    cache = getattr(config, "_inductor_cache", None)
    if cache is not None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        shutil.rmtree(cache, ignore_errors=True)


#: CPU threads each test runs on: 1 (small tests slow down many times when threads compete on a
#: shared 2-core machine); CTRL_CSC_TEST_THREADS=2 runs the suite on other kernels' summation
#: orders, to check that no verdict depends on them.
TEST_THREADS = int(os.environ.get("CTRL_CSC_TEST_THREADS", "1"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Each test starts from seed 0 on ``TEST_THREADS`` CPU threads; the thread count is restored
    afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
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
