"""Shared test set-up: the project root on sys.path, and a throw-away cache folder.

teachers.toy_teacher caches fitted toy teachers under $TDM_CACHE (default ~/.cache/tdm); the tests
point it at a session temporary folder so they never write outside pytest's tmp area.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session", autouse=True)
def _tdm_cache(tmp_path_factory):
    old = os.environ.get("TDM_CACHE")
    os.environ["TDM_CACHE"] = str(tmp_path_factory.mktemp("tdm_cache"))
    yield os.environ["TDM_CACHE"]
    if old is None:
        os.environ.pop("TDM_CACHE", None)
    else:
        os.environ["TDM_CACHE"] = old
