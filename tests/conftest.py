"""Shared fixtures. tiny_checkpoint builds (once per session and per parameter set) a tiny
random Hugging Face checkpoint with tests/tiny_models.py."""
from __future__ import annotations

import pytest


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped where CuPy sees no NVIDIA GPU."""
    if any("gpu" in item.keywords for item in items) and not _gpu_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CuPy")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(arch="llama", tied=True, dtype="float32", sharded=False,
    tokenizer="hf-json", seed=0) -> Path of a cached HF model folder (treat it as read-only)."""
    from tiny_models import make_tiny_checkpoint

    cache = {}

    def build(arch="llama", tied=True, dtype="float32", sharded=False, tokenizer="hf-json", seed=0):
        key = (arch, tied, dtype, sharded, tokenizer, seed)
        if key not in cache:
            name = "-".join(str(k) for k in key)
            cache[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(name), arch, tied, dtype,
                                              sharded, tokenizer, seed)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def cuda_host(tmp_path_factory):
    """kernels/cuda's .cu files built for the host by g++ (tests/cuda_emulation.py), as a ctypes
    library; skips the test without g++."""
    from cuda_emulation import build_host

    lib = build_host(tmp_path_factory.mktemp("cuda-host"))
    if lib is None:
        pytest.skip("g++ is not installed")
    return lib


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches the code under test writes (sampled calibration windows) go to a temporary folder,
    never the user's home."""
    import os

    old = os.environ.get("QFORMAT_CACHE")
    os.environ["QFORMAT_CACHE"] = str(tmp_path_factory.mktemp("qformat-cache"))
    yield
    if old is None:
        os.environ.pop("QFORMAT_CACHE", None)
    else:
        os.environ["QFORMAT_CACHE"] = old
