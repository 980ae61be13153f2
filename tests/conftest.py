"""Shared test set-up: one torch thread, and a throw-away cache folder (pytest.ini puts the root on sys.path).

teachers.toy_teacher caches fitted toy teachers under $TDM_CACHE (default ~/.cache/tdm); the tests
point it at a session temporary folder so they never write outside pytest's tmp area.
"""
import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting on a shared 2-core machine (up to 50x faster here)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session", autouse=True)
def _tdm_cache(tmp_path_factory):
    old = os.environ.get("TDM_CACHE")
    os.environ["TDM_CACHE"] = str(tmp_path_factory.mktemp("tdm_cache"))
    yield os.environ["TDM_CACHE"]
    if old is None:
        os.environ.pop("TDM_CACHE", None)
    else:
        os.environ["TDM_CACHE"] = old
