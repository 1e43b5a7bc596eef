"""The command line: defaults and --help."""

from __future__ import annotations

import subprocess
import sys

from server.cli import build_parser, resolve_model_arg
from server.demo_model_path import demo_model_dir


def test_serve_defaults_to_the_demo_model():
    args = build_parser().parse_args(["serve"])
    assert resolve_model_arg(args) == str(demo_model_dir())
    assert (demo_model_dir() / "model.safetensors").is_file()
    args = build_parser().parse_args(["serve", "--model", "/some/dir"])
    assert resolve_model_arg(args) == "/some/dir"
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def test_kernel_flags_reach_the_engine_config():
    from server.frontend.server import engine_config_from_args

    args = build_parser().parse_args(["serve", "--attention-backend", "triton",
                                      "--quantization", "int4", "--device", "cuda"])
    cfg = engine_config_from_args(args, "/m")
    assert (cfg.model.attention_backend, cfg.model.quantization, cfg.device) == (
        "triton", "int4", "cuda")
    assert build_parser().parse_args(["serve"]).quantization is None


def test_serve_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--model", "--host", "--port", "--served-model-name", "--api-key",
                 "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--dtype",
                 "--block-size", "--kv-cache-memory", "--gpu-memory-utilization",
                 "--enable-prefix-caching", "--seed", "--attention-backend", "--quantization"):
        assert flag in out
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001
    assert all(a.help for a in serve._actions)  # noqa: SLF001
