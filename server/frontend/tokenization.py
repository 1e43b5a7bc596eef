"""Tokenizer calls for the front end, kept off the event loop.

Long prompts take milliseconds to encode and chat templates run Jinja, so both run on a
single worker thread: one thread because a Hugging Face fast tokenizer mutates its
truncation state on every call and is not safe to call from two threads at once.
Single-token decodes (logprob strings) are microseconds and stay on the loop.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.frontend.errors import APIError


class TokenizerService:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conveyor-tokenizer")

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = await self._run(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return list(ids)

    async def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return await self._run(self.tokenizer.decode, ids,
                               skip_special_tokens=skip_special_tokens)

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def has_chat_template(self) -> bool:
        return getattr(self.tokenizer, "chat_template", None) is not None

    async def render_chat(self, messages: list[dict[str, str]],
                          add_generation_prompt: bool) -> str:
        """The prompt text for `messages`; a 400 naming `messages` if the template fails."""
        if not self.has_chat_template():
            raise APIError("This model's tokenizer has no chat template, so chat requests "
                           "cannot be rendered; use /v1/completions with a plain prompt.",
                           param="messages", code="chat_template_missing")
        try:
            return await self._run(self.tokenizer.apply_chat_template, messages,
                                   add_generation_prompt=add_generation_prompt,
                                   tokenize=False)
        except Exception as exc:  # Jinja raises TemplateError or anything the template does
            raise APIError(f"The chat template could not render these messages: {exc}",
                           param="messages") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
