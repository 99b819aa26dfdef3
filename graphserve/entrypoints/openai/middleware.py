"""The server's gate (a pure ASGI middleware, so streamed responses pass through untouched).

In order: 503 while the model loads or the server drains, 401 without the API key, 413 for an oversized body.
"""
from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from graphserve.entrypoints.openai.errors import error_body

# Reachable while starting and draining (a load balancer reads /health itself: it reports 503 then).
ALWAYS_OPEN_PATHS = frozenset({"/version", "/metrics"})
# Reachable without the API key (vLLM keeps these open too: they reveal nothing and cost nothing).
PUBLIC_PATHS = frozenset({"/health", "/version", "/metrics"})


class RequestTooLarge(Exception):
    """A chunked request body went past the size limit while being read."""


async def send_error(send: Callable, message: str, status_code: int, headers: dict[str, str] | None = None) -> None:
    """Answer with OpenAI's error body straight on the ASGI channel."""
    body = json.dumps(error_body(message, status_code)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status_code, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class ServerGuardMiddleware:
    """Refuses what must not reach the endpoints; `state` says whether the server is ready or draining."""

    def __init__(self, app: Any, state: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.state = state
        self._api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path not in ALWAYS_OPEN_PATHS:
            if self.state.draining:
                await send_error(send, "The server is shutting down.", 503, {"Connection": "close"})
                return
            if not self.state.ready:
                await send_error(send, "The server is starting: the model is still loading.", 503,
                                 {"Retry-After": "5"})
                return
        if self._api_key is not None and scope["method"] != "OPTIONS" and path not in PUBLIC_PATHS:
            if not self._authorized(scope):
                await send_error(send, "Unauthorized: a valid API key is required (Authorization: Bearer KEY).",
                                 401, {"WWW-Authenticate": "Bearer"})
                return
        content_length = _header(scope, b"content-length")
        if content_length is not None:
            if not content_length.isdigit() or int(content_length) > self.max_body_bytes:
                await send_error(send, f"The request body is larger than {self.max_body_bytes} bytes.", 413)
                return
        elif scope["method"] in ("POST", "PUT", "PATCH"):
            receive = self._limited(receive)
        await self.app(scope, receive, send)

    def _authorized(self, scope: dict) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        # Constant time: the comparison must not leak how much of a guessed key is right.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key)

    def _limited(self, receive: Callable) -> Callable:
        """Wrap `receive` so that a chunked body cannot grow past the limit."""
        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(f"The request body is larger than {limit} bytes.")
            return message

        return limited_receive


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None
