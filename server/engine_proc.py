"""The engine's own process: a synchronous loop that sleeps on its inbox when idle.

Messages are small typed tuples over two one-way pipes (no ports, no shared buffers):
  front end -> engine: AddRequest | ("abort", ids) | ("stop", ids) | ("stats", token)
                       | ("shutdown",)
  engine -> front end: ("ready", EngineInfo) | ("outputs", [EngineCoreOutput])
                       | ("stats", token, dict) | ("error", message)
Only plain data crosses: request fields, sampling params, outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection

from server.config import EngineConfig
from server.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How often an idle engine checks that its parent is still alive.
_IDLE_POLL_S = 1.0


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    share_key: str | None
    arrival_time: float
    priority: int = 0
    tenant: str | None = None
    tenant_weight: float = 1.0


def engine_main(config: EngineConfig, eos_token_ids: frozenset[int], inbox: Connection,
                outbox: Connection, log_level: int = logging.INFO) -> None:
    """Process entry point: build the engine, then serve the inbox until shutdown."""
    logging.basicConfig(level=log_level, format="%(asctime)s engine %(levelname)s %(message)s")
    try:
        from server.engine_factory import build_engine_core

        core, info, _ = build_engine_core(config, eos_token_ids)
    except Exception as e:  # noqa: BLE001 - reported to the front end, which exits
        logger.exception("engine failed to start")
        outbox.send(("error", f"engine failed to start: {type(e).__name__}: {e}"))
        return
    outbox.send(("ready", info))
    try:
        run_loop(core, eos_token_ids, inbox, outbox)
    except (EOFError, BrokenPipeError, OSError):
        logger.info("front end went away; engine exits")
    except Exception as e:  # noqa: BLE001
        logger.exception("engine loop crashed")
        with contextlib.suppress(OSError):
            outbox.send(("error", f"engine crashed: {type(e).__name__}: {e}"))
        raise


def run_loop(core, eos_token_ids: frozenset[int], inbox: Connection,
             outbox: Connection) -> None:
    from server.request import Request

    parent = os.getppid()
    # Wall time spent in steps: its rate is the engine's busy fraction (utilization).
    busy_s = 0.0
    while True:
        if not core.has_unfinished_requests():
            while not inbox.poll(_IDLE_POLL_S):
                if os.getppid() != parent:
                    return  # orphaned: the front end died without telling us
        while inbox.poll(0):
            msg = inbox.recv()
            if isinstance(msg, AddRequest):
                core.add_request(Request(
                    msg.request_id, msg.prompt_token_ids, msg.params, eos_token_ids,
                    arrival_time=msg.arrival_time, max_tokens=msg.max_tokens,
                    share_key=msg.share_key, priority=msg.priority, tenant=msg.tenant,
                    tenant_weight=msg.tenant_weight))
            elif msg[0] == "abort":
                core.abort_requests(msg[1])
            elif msg[0] == "stop":
                core.stop_requests(msg[1])
            elif msg[0] == "stats":
                outbox.send(("stats", msg[1],
                             {**asdict(core.stats()), "engine_busy_seconds": busy_s}))
            elif msg[0] == "shutdown":
                return
        if core.has_unfinished_requests():
            t0 = time.perf_counter()
            outputs = core.step()
            busy_s += time.perf_counter() - t0
            if outputs:
                outbox.send(("outputs", outputs))
