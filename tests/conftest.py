"""Shared fixtures. Environment first: Triton must see TRITON_INTERPRET before any import."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.tiny_models import ARCH_CONFIGS, build_model, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tokenizer_dir):
    """build(arch, **overrides) -> model dir, cached per distinct argument set."""
    cache: dict[tuple, Path] = {}

    def build(arch: str = "llama", **kwargs) -> Path:
        key = (arch, tuple(sorted(kwargs.items(), key=lambda kv: kv[0])))
        key = (arch, repr(key[1]))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"model-{arch}")
            cache[key] = build_model(d, arch, tokenizer_dir=tokenizer_dir, **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session", params=sorted(ARCH_CONFIGS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where Triton kernel tests run: natively on a GPU (TRITON_INTERPRET=0), else on the
    CPU under the interpreter."""
    import torch

    from kernels.triton_utils import interpreting

    if torch.cuda.is_available() and not interpreting():
        return "cuda"
    if not interpreting():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    return "cpu"


@pytest.fixture(scope="module")
def tiny_llama_server(tiny_model_factory):
    """A real `conveyor serve` on the tiny llama, served as "tiny" (one per test module)."""
    from tests.server_process import running_server

    with running_server(tiny_model_factory("llama"), "--num-kv-blocks", "256",
                        "--served-model-name", "tiny") as s:
        yield s
