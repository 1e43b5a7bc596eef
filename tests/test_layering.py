"""The layering rules of ARCHITECTURE.md, checked in a clean interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules_after_import(*modules: str) -> set[str]:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print('\\n'.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return set(out.stdout.split())


def test_engine_core_is_pure_python():
    loaded = _modules_after_import("server.engine.scheduler", "server.engine.core",
                                   "server.sampling_params", "server.output_processor")
    assert "torch" not in loaded


def test_kernels_never_import_server():
    loaded = _modules_after_import("kernels", "kernels.reference", "kernels.cpu_native")
    assert not any(m == "server" or m.startswith("server.") for m in loaded)


def test_frontend_app_never_loads_torch_or_the_model():
    loaded = _modules_after_import("server.frontend.app")
    forbidden = {"torch", "server.runner", "server.model", "server.llm_engine"}
    assert not forbidden & loaded
    assert "server.frontend.routes" in loaded  # the import really built the app's modules
