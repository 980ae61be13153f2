"""Shared pytest set-up: one torch thread, a throw-away cache folder, and the session fixtures built from
fixtures.py (pytest.ini puts the repository root on sys.path; pytest puts tests/ there for fixtures.py).

toy.fitted_toy_network caches fitted toy teachers under $TDM_CACHE (default ~/.cache/tdm), and the image
teachers their prompt embeddings; the tests point it at a session temporary folder so they never write outside
pytest's tmp area.
"""
import os

import pytest
import torch

import teachers
import toy
from fixtures import PROMPTS, tiny_sd_and_single_files, write_tiny_pixart


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


@pytest.fixture(scope="module")
def fast_toy_teacher(tmp_path_factory):
    """A cheap fitted toy teacher for the CLIs.

    The CLIs call load_teacher("toy", target=..., log=...) -> ToyTeacher.load -> fitted_toy_network, which fits
    for 2,000 iterations (~30 s) on a cache miss. Here `toy.fit_toy_teacher` (looked up at call time by
    fitted_toy_network) is wrapped to fit for 100 iterations at batch 256 whatever it is asked, in a cache folder
    of this module's own: the entry is keyed as the 2000-iteration teacher but only this throw-away folder ever
    sees it. The teacher's quality does not matter to smoke / resume / error tests. Subprocesses (torchrun)
    inherit $TDM_CACHE and find the entry there.
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("TDM_CACHE", str(tmp_path_factory.mktemp("fast_teacher_cache")))
    original = toy.fit_toy_teacher

    def fit_fast(gmm, iters=2000, **kw):
        return original(gmm, **{**kw, "iters": 100, "batch": 256})
    mp.setattr(toy, "fit_toy_teacher", fit_fast)
    teachers.load_teacher("toy", target="ring", log=None)          # fit once; later loads hit the cache
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory):
    """(folder, prompts file): one tiny random PixArt pipeline folder (512-style) and a prompt file, per session."""
    root = tmp_path_factory.mktemp("tiny_pixart")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return write_tiny_pixart(str(root / "PixArt-tiny")), str(prompts)


@pytest.fixture(scope="session")
def tiny_pixart_ms(tmp_path_factory):
    """One tiny random 1024-MS-style PixArt pipeline folder (resolution / aspect-ratio micro-conditions), per session."""
    return write_tiny_pixart(str(tmp_path_factory.mktemp("tiny_pixart_ms") / "PixArt-tiny-ms"), ms=True)


@pytest.fixture(scope="session", params=["sd15", "sdxl"])
def tiny_sd_single(request, tmp_path_factory):
    """(style, folder, {"safetensors": path, "ckpt": path}): a tiny SD1.5- or SDXL-style pipeline folder and the same
    weights as original single files, with what real files also carry (a differing EMA copy, the schedule
    buffers); shared by the UNet and VAE tests."""
    style = request.param
    return (style, *tiny_sd_and_single_files(str(tmp_path_factory.mktemp(f"single_{style}")), style))
