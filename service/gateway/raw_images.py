"""The raw-tensor image form: `{"shape": [H, W, 3], "dtype": "uint8", "data": "<base64>"}`.

Trainers hold decoded images; sending them as PNG costs an encode on the client and a decode
here. The raw form carries the H × W × 3 bytes (C order, RGB) in standard base64, and is
checked before a pixel is allocated, cheapest first, each failure an `ApiError` naming the
field (``items[i].image.shape`` ...) and the limit:

1. keys: exactly `shape`, `dtype`, `data` (an unknown key is a typo, not something to ignore);
2. `dtype`: "uint8" only;
3. `shape`: exactly 3 positive integers, the last 3;
4. H × W against `max_image_pixels`, the aspect ratio against `max_image_aspect_ratio`, the
   request's running total against `max_request_pixels` — the PNG path's codes and statuses;
5. `data`: a string whose base64 length decodes to exactly H × W × 3 bytes (computed from its
   length and padding, before decoding), then strict base64.

The pixels come out as the same uint8 [H, W, 3] array a decoded PNG gives, so they go through
the same preprocessing and give the same reward.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

import numpy as np

from service.gateway.errors import ApiError
from service.gateway.images import ImageLimits, check_image_size

RAW_KEYS = ("shape", "dtype", "data")
RAW_DTYPES = ("uint8",)
RAW_IMAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "RawImage",
    "description": "decoded pixels: shape [H, W, 3], dtype uint8, data = standard base64 of "
    "the H*W*3 bytes (C order, RGB)",
    "additionalProperties": False,
    "required": list(RAW_KEYS),
    "properties": {
        "shape": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1},
            "minItems": 3,
            "maxItems": 3,
            "description": "[H, W, 3]",
        },
        "dtype": {"type": "string", "enum": list(RAW_DTYPES)},
        "data": {"type": "string", "contentEncoding": "base64"},
    },
}


def _invalid(field: str, message: str, limit: Any = None, code: str = "invalid_raw_image"):
    return ApiError(422, code, f"{field}: {message}", field=field, limit=limit)


def raw_shape(image: dict[str, Any], field: str) -> tuple[int, int]:
    """(H, W) of a raw image after checking its keys, dtype and shape (no pixel touched)."""
    for key in image:
        if key not in RAW_KEYS:
            raise _invalid(
                f"{field}.{key}",
                f"unknown key {key!r} in a raw image (its keys are shape, dtype, data)",
                limit=list(RAW_KEYS),
            )
    for key in RAW_KEYS:
        if key not in image:
            raise _invalid(f"{field}.{key}", f"a raw image needs {key!r}", limit=list(RAW_KEYS))
    dtype = image["dtype"]
    if dtype not in RAW_DTYPES or not isinstance(dtype, str):
        raise _invalid(
            f"{field}.dtype",
            f"dtype {dtype!r} is not supported (only uint8)",
            limit=list(RAW_DTYPES),
            code="unsupported_raw_dtype",
        )
    shape = image["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        or shape[2] != 3
    ):
        raise _invalid(
            f"{field}.shape",
            f"shape must be [H, W, 3] with positive integers, got {_brief(shape)}",
            limit="[H, W, 3]",
        )
    return shape[0], shape[1]


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def decode_raw_image(
    image: dict[str, Any],
    field: str,
    limits: ImageLimits,
    request_pixels: int = 0,
    reserve: Callable[[int], None] | None = None,
) -> np.ndarray:
    """A raw image → uint8 [H, W, 3], or an ApiError naming the field and the limit.

    `request_pixels`: pixels of the request's earlier images; `reserve(nbytes)` is called with
    H × W × 3 after every check that needs no decoding and before the bytes are decoded."""
    height, width = raw_shape(image, field)
    check_image_size(field, width, height, limits, request_pixels)
    expected = height * width * 3
    data = image["data"]
    where = f"{field}.data"
    if not isinstance(data, str):
        raise _invalid(where, "data must be a base64 string", limit=expected)
    padding = len(data) - len(data.rstrip("="))
    if len(data) % 4 or padding > 2:
        raise ApiError(
            422,
            "invalid_base64",
            f"{where}: not valid base64 (standard alphabet, padded to a multiple of 4)",
            field=where,
            limit=expected,
        )
    length = len(data) // 4 * 3 - padding
    if length != expected:
        raise _invalid(
            where,
            f"{length} bytes, but shape [{height}, {width}, 3] needs {expected}",
            limit=expected,
            code="raw_image_size_mismatch",
        )
    if reserve is not None:
        reserve(expected)
    try:
        pixels = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            422,
            "invalid_base64",
            f"{where}: not valid base64 (standard alphabet)",
            field=where,
            limit=expected,
        ) from None
    if len(pixels) != expected:  # unreachable after the length check, kept as a guard
        raise _invalid(where, f"decoded to {len(pixels)} bytes, expected {expected}", expected)
    return np.frombuffer(pixels, np.uint8).reshape(height, width, 3)
