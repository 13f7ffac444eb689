"""What a request carries: an `analyze` request's multipart form, an OpenAI `image_url` data
URL, the check that image bytes are a readable image (whose sha256 is the `image` sticky key),
and the checks every input passes before any decoding (`checked_input`)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from mondrian.serve.errors import ServiceError

if TYPE_CHECKING:
    from fastapi import Request

MAX_PIXELS = 40_000_000


@dataclass
class AnalyzeForm:
    """The fields of a multipart `analyze` request."""

    text: str | None
    user: str | None
    pin: str | None
    max_tokens: int | None
    image: bytes | None


async def read_analyze_form(request: Request) -> AnalyzeForm:
    """A multipart `analyze` body: `text`, `user`, `version`, `max_tokens` fields and an
    `image` file; at least a text or an image."""
    try:
        form = await request.form()
    except ServiceError:
        raise  # the body guard's 408 / 413
    except Exception as exc:  # noqa: BLE001 - the multipart parser raises many kinds
        raise ServiceError(400, f"malformed multipart body ({exc})") from None
    text, user, pin = form.get("text"), form.get("user"), form.get("version")
    upload = form.get("image")
    image = await upload.read() if upload is not None and hasattr(upload, "read") else None
    if image is None and not isinstance(text, str):
        raise ServiceError(400, "a form needs a 'text' field or an 'image' file")
    try:
        max_tokens = int(form["max_tokens"]) if form.get("max_tokens") is not None else None
    except ValueError:
        raise ServiceError(400, f"max_tokens {form.get('max_tokens')!r} must be an integer") from None
    return AnalyzeForm(text if isinstance(text, str) else None, user if isinstance(user, str) else None,
                       pin if isinstance(pin, str) else None, max_tokens, image)


def image_sha256(data: bytes, limit_pixels: int = MAX_PIXELS) -> str:
    """Check that the bytes are a decodable image (corrupt bytes -> 400) and return their sha256."""
    if not data:
        raise ServiceError(400, "the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > limit_pixels:
                raise ServiceError(413, f"the image is {im.width}x{im.height}; the limit is {limit_pixels} pixels")
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except ServiceError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for corrupt bytes
        raise ServiceError(400, f"the image bytes are not a readable image ({type(exc).__name__}: {exc})") from None
    return hashlib.sha256(data).hexdigest()


def data_url_bytes(image_url: object, where: str) -> bytes:
    """The bytes of an OpenAI `image_url` part given as a base64 data URL (the service fetches
    nothing from the network)."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ServiceError(400, f"{where}: image_url must be a base64 data URL (data:image/png;base64,...); "
                                "the service does not fetch URLs")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError(400, f"{where}: image_url is not valid base64 ({exc})") from None


async def checked_input(advisor: str, vision: bool, text: str | None, image: bytes | None,
                        max_tokens: int | None, max_input_chars: int, **strings: str | None
                        ) -> tuple[str, str | None]:
    """The request's text ("" for none) and its image's sha256, after the input checks.
    `strings` (user, pin...) must be text too: a lone surrogate is a 400 here, not a 500 when
    the row is written."""
    if vision and image is None:
        raise ServiceError(400, f"advisor {advisor} takes an image: upload it as the multipart field 'image' "
                                "(or an image_url data URL in a chat message)")
    # decoding checks the image off the event loop (a large one takes a while)
    image_key = await asyncio.to_thread(image_sha256, image) if image is not None else None
    if not vision and image is not None:  # corrupt bytes got their own 400 first
        raise ServiceError(400, f"advisor {advisor} takes text; send the question as 'text', not an image")
    text = text or ""
    if not isinstance(text, str) or (not vision and not text.strip()):
        raise ServiceError(400, "the input text is empty")
    for name, value in {"text": text, **strings}.items():
        try:
            if value is not None:
                value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ServiceError(400, f"'{name}' holds a lone surrogate \\u{ord(value[exc.start]):04x}, "
                                    "which is not text") from None
    if len(text) > max_input_chars:
        raise ServiceError(413, f"input text is {len(text)} characters; the limit is {max_input_chars}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096):
        raise ServiceError(400, f"max_tokens {max_tokens!r} must be an integer in 1..4096")
    return text, image_key
