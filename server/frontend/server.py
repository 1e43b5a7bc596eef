"""`conveyor serve`: start the engine process and uvicorn, exit when either stops.

The HTTP server listens at once (health is 503 until the model is loaded); if the engine
dies, in-flight requests get errors, health turns 503 and the process exits non-zero.

SIGTERM or SIGINT drains instead of stopping uvicorn at once (which would close the
listening socket, so load balancers would see refused connections, not a 503): readiness
turns 503, running requests get --shutdown-timeout seconds, then uvicorn and the engine
stop and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

if TYPE_CHECKING:
    import uvicorn

    from server.frontend.request_limits import RequestLimits
    from server.frontend.tenants import Tenants

logger = logging.getLogger("conveyor.server")


def engine_config_from_args(args: argparse.Namespace, model: str) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=model, dtype=args.dtype, tokenizer=args.tokenizer,
                          max_model_len=args.max_model_len, seed=args.seed,
                          attention_backend=args.attention_backend,
                          quantization=args.quantization),
        cache=CacheConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                          kv_cache_memory=args.kv_cache_memory,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          enable_prefix_caching=args.enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens,
                                  long_prefill_token_threshold=args.long_prefill_token_threshold,
                                  priority_aging_steps=args.priority_aging_steps),
        device=args.device,
    )


def _configure_logging(log_format: str) -> None:
    if log_format == "json":
        from server.frontend.request_log import JSONFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JSONFormatter())
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    else:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")


def run_server(args: argparse.Namespace) -> int:
    _configure_logging(getattr(args, "log_format", "text"))
    from server.cli import resolve_model_arg
    from server.demo_model_path import DEMO_MODEL_NAME

    try:
        model_path = Path(resolve_model_arg(args))
    except FileNotFoundError as e:
        logger.error("%s", e)
        return 2
    if not model_path.is_dir():
        logger.error("model directory %s does not exist", model_path)
        return 2
    from server.frontend.request_limits import RequestLimits
    from server.frontend.tenants import Tenants

    try:  # before the model loads: a bad keys file or limit fails fast, naming the entry
        limits = RequestLimits.from_args(args)
        keys_file = getattr(args, "api_keys_file", None)
        tenants = Tenants.from_file(keys_file) if keys_file else None
    except ValueError as e:
        logger.error("%s", e)
        return 2
    config = engine_config_from_args(args, str(model_path))
    from transformers import AutoTokenizer

    from server.engine_factory import resolve_eos_token_ids

    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer_path)
    eos = resolve_eos_token_ids(model_path, tokenizer)
    served = args.served_model_name or (DEMO_MODEL_NAME if not args.model
                                        else model_path.resolve().name)
    api_key = args.api_key or os.environ.get("CONVEYOR_API_KEY") or None
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve(args, config, tokenizer, eos, served, api_key,
                                 limits=limits, tenants=tenants))


def _loop_factory():
    """uvloop when installed: the front end spends its CPU on per-token socket writes."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(args: argparse.Namespace, config: EngineConfig, tokenizer,
                 eos: frozenset[int], served: str, api_key: str | None, *,
                 limits: RequestLimits | None = None, tenants: Tenants | None = None) -> int:
    import uvicorn

    from server.frontend.app import build_app
    from server.frontend.async_engine import AsyncEngine
    from server.frontend.lifecycle import Lifecycle
    from server.frontend.metrics import Metrics

    engine = AsyncEngine(config, tokenizer, eos)
    metrics = Metrics(served, vllm_names=getattr(args, "vllm_metric_names", False),
                      cost_per_hour=getattr(args, "cost_per_hour", None))
    lifecycle = Lifecycle()
    app = build_app(engine, tokenizer, served, api_key, metrics, lifecycle=lifecycle,
                    log_json=getattr(args, "log_format", "text") == "json",
                    log_prompts=getattr(args, "log_prompts", False), limits=limits,
                    tenants=tenants)
    shutdown_timeout = float(getattr(args, "shutdown_timeout", 30.0))
    loop = asyncio.get_running_loop()
    drain_tasks: list[asyncio.Task] = []

    def start_drain() -> None:
        drain_tasks.append(asyncio.ensure_future(drain_then_exit()))

    async def drain_then_exit() -> None:
        logger.info("shutting down: refusing new requests, draining for up to %gs",
                    shutdown_timeout)
        cut = await lifecycle.drain(shutdown_timeout)
        if cut:
            logger.warning("aborted %d request(s) still running after %gs", cut,
                           shutdown_timeout)
        server.should_exit = True

    server = _draining_server(uvicorn.Config(app, host=args.host, port=args.port,
                                             log_level="warning", timeout_keep_alive=30,
                                             timeout_graceful_shutdown=5),
                              lambda: loop.call_soon_threadsafe(start_drain))
    engine_failed = False

    async def watch_engine() -> None:
        nonlocal engine_failed
        try:
            await engine.wait_ready()
            logger.info("serving %s on http://%s:%d", served, args.host, args.port)
        except Exception:  # noqa: BLE001 - the dead event below says the rest
            pass
        await engine.dead.wait()
        engine_failed = True
        server.should_exit = True

    watcher = asyncio.create_task(watch_engine())
    try:
        await server.serve()
    finally:
        watcher.cancel()
        for task in drain_tasks:
            task.cancel()
        failed_before_shutdown = engine_failed
        await engine.shutdown()
    if failed_before_shutdown:
        logger.error("exiting: %s", engine.dead_reason)
        return 1
    return 0


def _draining_server(config: uvicorn.Config,
                     on_first_signal: Callable[[], None]) -> uvicorn.Server:
    """A uvicorn.Server whose first SIGTERM/SIGINT calls `on_first_signal` (which starts
    the drain) instead of stopping; a second one stops at once. Built here so that uvicorn
    is imported only when serving."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self.drain_requested = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Runs in the signal handler: only flags and a thread-safe loop callback. Not
            # recorded for re-raising (uvicorn re-raises captured signals after serving,
            # which would turn a clean drain into death by SIGTERM).
            if self.drain_requested:
                self.should_exit = True
                self.force_exit = True
                return
            self.drain_requested = True
            on_first_signal()

    return DrainingServer()
