"""The front end's handle on the engine: spawns the engine process, streams outputs.

One reader thread receives engine messages and hands them to the event loop, where the
output processor (detokenizer, stop strings, n > 1) fans them out to one asyncio queue
per request. Sending is done from the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from server.config import EngineConfig
from server.engine_proc import AddRequest, engine_main
from server.frontend.engine_client import EngineClient, EngineDeadError, ModelInfo
from server.output_processor import OutputProcessor
from server.outputs import RequestOutput
from server.request import resolve_max_tokens, validate_prompt, validate_scheduling
from server.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_SHUTDOWN = "engine shut down"


class AsyncEngine(EngineClient):
    """EngineClient over an engine running in a spawned process."""

    def __init__(self, config: EngineConfig, tokenizer: Any, eos_token_ids: frozenset[int],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.info = ModelInfo(max_model_len=0, vocab_size=0, eos_token_ids=eos_token_ids)
        self.engine_info = None
        self.dead_reason: str | None = None
        # Set when the engine stops for any reason; the server exits when it does.
        self.dead = asyncio.Event()
        self._loop = loop or asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._queues: dict[str, asyncio.Queue] = {}
        self._stats_waiters: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count()
        self._processor = OutputProcessor(tokenizer)
        self._send_lock = threading.Lock()
        ctx = mp.get_context("spawn")
        to_engine_r, self._to_engine = ctx.Pipe(duplex=False)
        self._from_engine, from_engine_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=engine_main, name="conveyor-engine", daemon=True,
            args=(config, eos_token_ids, to_engine_r, from_engine_w,
                  logging.getLogger().getEffectiveLevel()),
        )
        self.process.start()
        # Our copies of the engine's ends must close, or its death never reads as EOF.
        to_engine_r.close()
        from_engine_w.close()
        self._reader = threading.Thread(target=self._read_loop, name="engine-reader",
                                        daemon=True)
        self._reader.start()

    # ---- lifecycle ----------------------------------------------------------------------

    async def wait_ready(self) -> None:
        """Returns once the model is loaded; raises EngineDeadError if it failed to."""
        await asyncio.shield(self._ready)

    def is_ready(self) -> bool:
        return self._ready.done() and not self._ready.exception() and self.dead_reason is None

    def is_dead(self) -> bool:
        return self.dead_reason is not None

    async def shutdown(self) -> None:
        if self.process.is_alive() and self.dead_reason is None:
            with contextlib.suppress(EngineDeadError):
                self._send(("shutdown",))
        await asyncio.to_thread(self.process.join, 10)
        if self.process.is_alive():
            self.process.kill()
        self._mark_dead(_SHUTDOWN)

    # ---- engine messages (reader thread -> event loop) ------------------------------------

    def _read_loop(self) -> None:
        while True:
            try:
                msg = self._from_engine.recv()
            except (EOFError, OSError):
                # EOF can arrive before the process is reaped; wait a moment for its code.
                self.process.join(1.0)
                code = self.process.exitcode
                self._loop.call_soon_threadsafe(
                    self._mark_dead, f"engine process exited (exit code {code})")
                return
            self._loop.call_soon_threadsafe(self._on_message, msg)

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "outputs":
            result = self._processor.process(msg[1])
            if result.stop_string_req_ids:
                self._send(("stop", result.stop_string_req_ids))
            for out in result.request_outputs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
        elif kind == "ready":
            info = msg[1]
            self.engine_info = info
            self.info = ModelInfo(info.max_model_len, info.vocab_size, self.eos_token_ids)
            if not self._ready.done():
                self._ready.set_result(None)
        elif kind == "stats":
            fut = self._stats_waiters.pop(msg[1], None)
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
        elif kind == "error":
            self._mark_dead(msg[1])

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        self.dead.set()
        logger.log(logging.INFO if reason == _SHUTDOWN else logging.ERROR, "%s", reason)
        err = EngineDeadError(reason)
        if not self._ready.done():
            self._ready.set_exception(err)
            self._ready.exception()  # mark retrieved: callers may never await it
        for q in self._queues.values():
            q.put_nowait(err)
        for fut in self._stats_waiters.values():
            if not fut.done():
                fut.set_exception(err)
        self._stats_waiters.clear()

    def _send(self, msg: object) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        try:
            with self._send_lock:
                self._to_engine.send(msg)
        except (BrokenPipeError, OSError) as e:
            self._mark_dead(f"engine process unreachable: {e}")
            raise EngineDeadError(self.dead_reason) from e

    # ---- requests -----------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams, *, priority: int = 0, tenant: str | None = None,
                       tenant_weight: float = 1.0) -> AsyncIterator[RequestOutput]:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if not self.is_ready():
            await self.wait_ready()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        validate_prompt(prompt_token_ids, params, self.info.vocab_size,
                        self.info.max_model_len)
        validate_scheduling(priority, tenant_weight)
        max_tokens = resolve_max_tokens(len(prompt_token_ids), params, self.info.max_model_len)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        child_ids = self._processor.add_request(request_id, prompt, prompt_token_ids, params,
                                                stream=True)
        finished = False
        try:
            now = time.monotonic()
            for cid in child_ids:
                self._send(AddRequest(cid, prompt_token_ids, params, max_tokens,
                                      request_id if params.n > 1 else None, now,
                                      priority, tenant, tenant_weight))
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> None:
        children = self._processor.abort([request_id])
        if children and self.dead_reason is None:
            with contextlib.suppress(EngineDeadError):
                self._send(("abort", children))

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)
        q = self._queues.pop(request_id, None)
        if q is not None:
            q.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))

    async def get_stats(self) -> dict[str, float]:
        token = next(self._tokens)
        fut = self._loop.create_future()
        self._stats_waiters[token] = fut
        self._send(("stats", token))
        stats = dict(await fut)
        stats["num_kv_blocks"] = self.engine_info.num_kv_blocks if self.engine_info else 0
        stats["engine_pid"] = self.process.pid
        return stats
