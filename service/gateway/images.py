"""Base64 images → uint8 RGB arrays, within limits, safely.

Order of checks, cheapest first, each failure an `ApiError` naming the field and the limit:
1. the encoded length (a string far over the byte limit is never decoded);
2. strict base64 (an optional `data:image/...;base64,` prefix and whitespace are allowed);
3. the decoded byte count (`max_image_bytes`, 413);
4. the format from the content's magic bytes, never from a claim: PNG, JPEG or WebP only (415);
5. width × height from the header, BEFORE any pixel is decoded (`max_image_pixels`, 413), so a
   decompression bomb costs nothing; Pillow's own bomb limit is set to the same value as a
   second line of defence;
6. the aspect ratio from the header (`max_image_aspect_ratio`, 422): the encoder resizes the
   shorter side to its input size, so a 1 × 16,000,000 image would be enormous there;
7. the request's running total of width × height from the headers (`max_request_pixels`, 413,
   naming the image that crossed it), so a small body of flat images cannot decode to GBs;
8. the decoded bytes (width × height × 3) are reserved from the admission budget
   (`reserve`, 429 when it is full), still before decoding;
9. decoding (only the first frame of an animation), then conversion to RGB as CLIP's
   processor does (transparency composited onto white); a truncated or corrupt file is a 422.

An image may also come as a raw tensor object (`service.gateway.raw_images`), checked against
the same limits with the same codes.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from textnorm_reward_client.images import to_rgb

from service.gateway.errors import ApiError

FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:[\w.+/-]*;base64,", re.ASCII)
_WHITESPACE = re.compile(r"\s")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    max_aspect_ratio: float
    max_request_pixels: int

    @property
    def max_encoded_chars(self) -> int:
        return 4 * -(-self.max_bytes // 3)


def set_pillow_limits(limits: ImageLimits) -> None:
    """Pillow's decompression-bomb limit (process-wide) to our pixel limit.

    Images over it are refused from their header (see `decode_image`) before Pillow would warn,
    so its warning is silenced; over twice the limit Pillow raises, which is a 413 too.
    """
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def sniff_format(data: bytes) -> str | None:
    """The image format from magic bytes: PNG, JPEG, WEBP, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_base64(text: str, field: str, limits: ImageLimits) -> bytes:
    if len(text) > 2 * limits.max_encoded_chars + 256:  # too long even with whitespace
        raise _too_many_bytes(field, limits)
    if text.startswith("data:"):
        text = _DATA_URL.sub("", text, count=1)
    data = _strict_base64(text) if 0 < len(text) <= limits.max_encoded_chars else None
    if data is None:  # whitespace (line-wrapped base64), empty, too long or invalid: say which
        data = _careful_base64(text, field, limits)
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(field, limits)
    return data


def _strict_base64(text: str) -> bytes | None:
    """One C pass over the common case (standard alphabet, no whitespace); None otherwise.
    Whatever it accepts, `base64.b64decode(text, validate=True)` decodes to the same bytes."""
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def _careful_base64(text: str, field: str, limits: ImageLimits) -> bytes:
    if _WHITESPACE.search(text):  # line-wrapped base64 (MIME style)
        text = "".join(text.split())
    if len(text) > limits.max_encoded_chars:
        raise _too_many_bytes(field, limits)
    if not text:
        raise ApiError(422, "invalid_image", f"{field}: the image is empty", field=field)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            422, "invalid_base64", f"{field}: not valid base64 (standard alphabet)", field=field
        ) from None


def _too_many_bytes(field: str, limits: ImageLimits) -> ApiError:
    return ApiError(
        413,
        "image_too_large",
        f"{field}: the image exceeds {limits.max_bytes} bytes (after base64 decoding)",
        field=field,
        limit=limits.max_bytes,
    )


def decode_images(
    images: list[tuple[str | dict[str, Any], str]],
    limits: ImageLimits,
    reserve: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """(base64 or raw tensor, field) pairs → uint8 [H, W, 3] arrays in order, within the
    request's pixels; `reserve(nbytes)` before each image is decoded (admission control)."""
    from service.gateway.raw_images import decode_raw_image  # it builds on this module

    arrays: list[np.ndarray] = []
    used = 0  # pixels of the images decoded so far
    for image, field in images:
        if isinstance(image, dict):
            array = decode_raw_image(image, field, limits, request_pixels=used, reserve=reserve)
        else:
            array = decode_image(image, field, limits, request_pixels=used, reserve=reserve)
        used += array.shape[0] * array.shape[1]
        arrays.append(array)
    return arrays


def check_image_size(
    field: str, width: int, height: int, limits: ImageLimits, request_pixels: int
) -> None:
    """Pixels, aspect ratio and the request's pixel budget of a width × height image."""
    if width < 1 or height < 1:
        raise ApiError(422, "invalid_image", f"{field}: the image has no pixels", field=field)
    if width * height > limits.max_pixels:
        raise _too_many_pixels(field, limits, (width, height))
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise ApiError(
            422,
            "image_aspect_ratio",
            f"{field}: the image's aspect ratio ({width}×{height}) exceeds "
            f"{limits.max_aspect_ratio:g}:1",
            field=field,
            limit=limits.max_aspect_ratio,
        )
    if request_pixels + width * height > limits.max_request_pixels:
        raise ApiError(
            413,
            "request_too_many_pixels",
            f"{field}: the request's images exceed {limits.max_request_pixels} pixels "
            "in all (width × height summed)",
            field=field,
            limit=limits.max_request_pixels,
        )


def decode_image(
    text: str,
    field: str,
    limits: ImageLimits,
    request_pixels: int = 0,
    reserve: Callable[[int], None] | None = None,
) -> np.ndarray:
    """A base64 PNG/JPEG/WebP → uint8 [H, W, 3] RGB, or an ApiError naming `field`.

    `request_pixels`: pixels the request's earlier images hold (`max_request_pixels` budget);
    `reserve(width × height × 3)` is called after the header checks, before decoding.
    """
    data = decode_base64(text, field, limits)
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(
            415,
            "unsupported_image_format",
            f"{field}: not a PNG, JPEG or WebP image (detected from its content)",
            field=field,
            limit=list(FORMATS),
        )
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError:
        raise _too_many_pixels(field, limits, None) from None
    except MemoryError:
        raise
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, struct.error, ...
        raise _corrupt(field, fmt, exc) from None
    with image:
        width, height = image.size
        check_image_size(field, width, height, limits, request_pixels)
        if reserve is not None:
            reserve(width * height * 3)
        try:
            image.seek(0)
            image.load()
            rgb = to_rgb(image)
            array = np.asarray(rgb, dtype=np.uint8)
        except Image.DecompressionBombError:
            raise _too_many_pixels(field, limits, (width, height)) from None
        except MemoryError:
            raise
        except Exception as exc:  # a corrupt or truncated file, whichever way Pillow says it
            raise _corrupt(field, fmt, exc) from None
    if array.ndim != 3 or array.shape[2] != 3:
        raise ApiError(422, "invalid_image", f"{field}: could not convert to RGB", field=field)
    return np.ascontiguousarray(array)


def _too_many_pixels(field: str, limits: ImageLimits, size: tuple[int, int] | None) -> ApiError:
    got = f" ({size[0]}×{size[1]})" if size else ""
    return ApiError(
        413,
        "image_too_many_pixels",
        f"{field}: the image has more than {limits.max_pixels} pixels{got}",
        field=field,
        limit=limits.max_pixels,
    )


def _corrupt(field: str, fmt: str, exc: BaseException) -> ApiError:
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return ApiError(
        422, "invalid_image", f"{field}: corrupt or truncated {fmt} ({reason})", field=field
    )
