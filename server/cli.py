"""`conveyor` command line. Parses flags, builds the engine, runs. No logic of its own."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from server.config import CacheConfig, SchedulerConfig
from server.config_sources import (
    CONFIG_ENV,
    ConfigError,
    apply_as_defaults,
    env_names,
    values_from_env,
    values_from_file,
)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", help="local Hugging Face model directory (default: the "
                   "built-in demo model, served as 'conveyor-demo')")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight and activation dtype; auto = the checkpoint's")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--attention-backend", default="auto",
                   choices=["auto", "torch", "cpu", "triton"],
                   help="auto = Triton on CUDA, the native C++ decode kernel on CPU when it "
                        "builds; torch = the pure-torch reference; triton = the Triton kernels "
                        "(CUDA, or CPU under TRITON_INTERPRET=1)")
    g.add_argument("--quantization", default=None, choices=["int8", "int4", "awq"],
                   help="weight-only quantization of the decoder's linear layers: int8 "
                        "(per-channel) or int4 (group size 128) quantize a bf16/fp16/fp32 "
                        "checkpoint at load; an AWQ int4 checkpoint (quant_method awq in "
                        "config.json) is detected and loaded as is (default: none)")
    g.add_argument("--max-model-len", type=int,
                   help="context length (default: the model's max_position_embeddings)")
    g.add_argument("--block-size", type=int, default=CacheConfig.block_size,
                   help="tokens per KV cache block")
    g.add_argument("--num-kv-blocks", type=int, help="exact KV cache size in blocks")
    g.add_argument("--kv-cache-memory", type=int,
                   help="KV cache size in bytes (CPU; default 4 GiB, or half the free host "
                        "memory if that is less)")
    g.add_argument("--gpu-memory-utilization", type=float,
                   default=CacheConfig.gpu_memory_utilization,
                   help="share of free GPU memory given to the KV cache (CUDA)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True, help="reuse KV blocks of shared prompt prefixes")
    g.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs,
                   help="most sequences running at once")
    g.add_argument("--max-num-batched-tokens", type=int,
                   default=SchedulerConfig.max_num_batched_tokens,
                   help="token budget per engine step; longer prompts are chunked")
    g.add_argument("--long-prefill-token-threshold", type=int,
                   default=SchedulerConfig.long_prefill_token_threshold,
                   help="most prompt tokens one request computes in a step while other "
                        "requests run or wait, so a long prompt does not hold up decodes "
                        "and short prompts (0 = no cap)")
    g.add_argument("--priority-aging-steps", type=int,
                   default=SchedulerConfig.priority_aging_steps,
                   help="a waiting request moves up one priority class (request field "
                        "'priority', lower first) per this many engine steps, so low "
                        "priorities cannot starve (0 = strict priority)")
    g.add_argument("--seed", type=int, default=0, help="seed for unseeded random sampling")


def resolve_model_arg(args: argparse.Namespace) -> str:
    """--model, or the built-in demo model when it is not given."""
    if args.model:
        return args.model
    from server.demo_model_path import demo_model_dir

    return str(demo_model_dir())


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
        attention_backend=args.attention_backend, quantization=args.quantization,
        max_model_len=args.max_model_len, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        priority_aging_steps=args.priority_aging_steps, seed=args.seed,
    )


def _generate(args: argparse.Namespace) -> int:
    from server import LLM, SamplingParams

    llm = LLM(resolve_model_arg(args), **engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sample_seed, stop=args.stop)
    for out in llm.generate(args.prompt, params, use_tqdm=len(args.prompt) > 1):
        for comp in out.outputs:
            print(f"--- {out.prompt!r} [{comp.finish_reason}]\n{out.prompt}{comp.text}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Imported here: the server pulls in uvicorn and the engine process machinery, which
    # `generate` does not need.
    from server.frontend.server import run_server

    return run_server(args)


def _usd(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"cost per hour must be >= 0, got {text!r}")
    return value


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                         description="Run the engine in its own process behind an "
                                     "OpenAI-compatible HTTP server.")
    add_engine_args(srv)
    h = srv.add_argument_group("http")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on")
    h.add_argument("--port", type=int, default=8000, help="port to listen on")
    h.add_argument("--served-model-name",
                   help="model name clients use (default: the model directory's name, or "
                       "'conveyor-demo' for the built-in model)")
    # The default is read by run_server, not here, so `--help` never prints the secret.
    h.add_argument("--api-key", help="require 'Authorization: Bearer <key>' "
                                     "(default: $CONVEYOR_API_KEY; unset = no auth)")
    h.add_argument("--vllm-metric-names", action="store_true",
                   help="export every /metrics series under the vllm: prefix too (same "
                        "values), for dashboards built for vLLM")
    h.add_argument("--cost-per-hour", type=_usd, metavar="USD",
                   help="what the node costs per hour: /metrics then exports the running "
                        "cost (hours since start x USD) and the cost per 1k output tokens "
                        "and per 10k requests")
    h.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds running requests get to finish before "
                        "they are aborted (readiness turns 503 and new generation requests "
                        "are refused at once; a second signal stops at once)")
    h.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="server log format; json also logs one line per finished HTTP "
                        "request (request id, route, status, tokens, TTFT, latency)")
    h.add_argument("--log-prompts", action="store_true",
                   help="include prompts and chat messages in the json request log lines "
                        "(default: never logged)")
    _add_admission_args(srv)
    srv.set_defaults(func=_serve)


def _add_admission_args(srv: argparse.ArgumentParser) -> None:
    a = srv.add_argument_group("admission and limits", "Refusals are OpenAI-shaped errors: "
                               "429 rate_limit_error with Retry-After, 400 naming the "
                               "parameter, 413 for a large body. 0 means unbounded.")
    a.add_argument("--max-num-queued-requests", type=int, default=1024,
                   help="most requests (one per prompt) accepted but not yet producing "
                        "output; more get 429 (running ones are bounded by --max-num-seqs)")
    a.add_argument("--max-queued-tokens", type=int, default=0,
                   help="most prompt tokens of those queued requests; more get 429")
    a.add_argument("--max-request-body-bytes", type=int, default=32 * 1024 * 1024,
                   help="largest request body; larger ones get 413 before they are parsed")
    a.add_argument("--max-prompt-tokens", type=int, default=0,
                   help="longest prompt in tokens (default: the context length)")
    a.add_argument("--max-n", type=int, default=128, help="largest `n` (choices per prompt)")
    a.add_argument("--max-tokens-limit", type=int, default=0,
                   help="largest max_tokens / max_completion_tokens a request may ask for")
    a.add_argument("--max-stop-strings", type=int, default=16,
                   help="most stop strings per request")
    a.add_argument("--max-stop-string-length", type=int, default=256,
                   help="longest stop string, in characters")
    a.add_argument("--request-timeout", type=float, default=0,
                   help="seconds a request may take from arrival to its last byte; then it "
                        "is aborted (its KV freed) and gets a 504 request_timeout error, or "
                        "a stream gets that error as its last event before [DONE]")
    a.add_argument("--api-keys-file", metavar="PATH",
                   help="YAML file of API keys, each with its tenant, requests_per_minute, "
                        "tokens_per_minute and weight (see configs/api-keys.example.yaml); "
                        "its keys authenticate and are rate-limited, --api-key stays an "
                        "unlimited admin key")


def _bench_serve(args: argparse.Namespace) -> int:
    from server.benchmarks.serve import run

    return run(args)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    # The load generator's module is torch-free and imports httpx only when it runs.
    from server.benchmarks.serve import add_args

    bench = sub.add_parser("bench", help="benchmarks", description="Conveyor benchmarks.")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    srv = kinds.add_parser("serve", help="load-test an OpenAI-compatible server",
                           description="Send a workload to an OpenAI-compatible server and "
                                       "report TTFT, TPOT, ITL, E2E latency and throughput.")
    add_args(srv)
    srv.set_defaults(func=_bench_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description="Conveyor LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate offline for prompts given on the command line",
                         description="Generate completions offline with continuous batching.")
    add_engine_args(gen)
    s = gen.add_argument_group("sampling")
    s.add_argument("--prompt", action="append", required=True,
                   help="a prompt (repeat for several; they run batched)")
    s.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k best (0 = off)")
    s.add_argument("--sample-seed", type=int, help="per-request sampling seed")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.set_defaults(func=_generate)
    _add_serve_parser(sub)
    for name in LAYERED_COMMANDS:
        _add_config_arg(sub.choices[name])
    _add_bench_parser(sub)
    return parser


# Commands whose flags may also come from CONVEYOR_* variables and a --config YAML file.
LAYERED_COMMANDS = ("generate", "serve")
_LAYERS_EPILOG = (
    "Every flag can also be set by the environment variable CONVEYOR_<FLAG> (dashes become "
    "underscores, upper case: --max-num-seqs is CONVEYOR_MAX_NUM_SEQS) or by a YAML file "
    "given with --config (keys are flag names, with dashes or underscores). Booleans take "
    "true/false, 1/0 or yes/no. Precedence: command line > environment > config file > "
    "defaults.")


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    """--config, and the env/file convention in the command's --help."""
    p.add_argument("--config", metavar="PATH",
                   help=f"YAML file of flag values (default: ${CONFIG_ENV}); see below")
    p.epilog = _LAYERS_EPILOG


def _config_path(argv: list[str], environ: Mapping[str, str]) -> str | None:
    """--config from the command line (without parsing the rest yet), else $CONVEYOR_CONFIG."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    # Only tokens before "--" are options.
    opts = argv[: argv.index("--")] if "--" in argv else argv
    return pre.parse_known_args(opts)[0].config or environ.get(CONFIG_ENV) or None


def parse_args(argv: list[str] | None = None,
               environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Parse the command line over the environment over the --config file over the defaults.

    Bad file keys and bad values exit with a usage error naming the key and where it came
    from; unknown CONVEYOR_* variables only warn (on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    parser = build_parser()
    command = argv[0] if argv else None
    if command not in LAYERED_COMMANDS:
        return parser.parse_args(argv)
    subs = next(a for a in parser._actions  # noqa: SLF001 -- argparse keeps it private
                if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    cmd = subs.choices[command]
    others = frozenset().union(*(env_names(subs.choices[c]) for c in LAYERED_COMMANDS))
    try:
        path = _config_path(argv[1:], environ)
        values = values_from_file(cmd, path) if path else {}
        from_env = values_from_env(cmd, environ, others)
    except ConfigError as exc:
        cmd.error(str(exc))
    values.update(from_env.values)  # the environment beats the file
    for warning in from_env.warnings:
        print(f"{cmd.prog}: warning: {warning}", file=sys.stderr)
    deferred = apply_as_defaults(cmd, values)
    args = parser.parse_args(argv)
    for dest in deferred:  # list flags: the command line replaces, never extends, them
        if getattr(args, dest) is None:
            setattr(args, dest, values[dest])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
