import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a pretrained-weight lookup would otherwise hang ~45 s
os.environ.setdefault("TQDM_DISABLE", "1")
# the tests' networks are tiny: one thread runs them faster than two, and the subprocesses some tests start (Dask
# workers, a process pool) then do not oversubscribe a 2-core machine (OMP_NUM_THREADS=N before pytest overrides)
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

import pytest  # noqa: E402

import methods  # noqa: E402,F401  (registers the methods)
from bench.core.task import synthetic_task  # noqa: E402


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for the tiny networks of the end-to-end tests, so each configuration trains once per pytest run
    (tests that count trainings or need an empty cache keep their own)."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture(scope="session")
def task():
    return synthetic_task()
