"""Request bodies read with a size limit, so that a huge upload is refused before it fills memory."""

from __future__ import annotations

from fastapi import HTTPException, Request
from starlette.types import Message

__all__ = ["limited_body", "limited_request"]


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"request larger than [web] max_upload_mb ({limit // (1024 * 1024)} MiB)")


async def limited_body(request: Request, limit: int) -> bytes:
    """The request body; HTTP 413 as soon as it passes ``limit`` bytes (or announces more)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


async def limited_request(request: Request, limit: int) -> Request:
    """A copy of ``request`` whose body was read with :func:`limited_body` (for form parsing)."""
    body = await limited_body(request, limit)
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)
