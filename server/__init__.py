"""Conveyor: a high-throughput LLM inference server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.outputs import CompletionOutput, RequestOutput
from server.sampling_params import SamplingParams

if TYPE_CHECKING:
    from server.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # LLM pulls in torch; keep `import server.<torch-free module>` light for the front end.
    if name == "LLM":
        from server.llm import LLM

        return LLM
    raise AttributeError(f"module 'server' has no attribute {name!r}")
