"""Base64 image fields: the one-pass fast path decodes exactly what the careful path would."""

from __future__ import annotations

import base64
import binascii
import itertools

import pytest

from service.gateway.errors import ApiError
from service.gateway.images import ImageLimits, decode_base64

LIMITS = ImageLimits(
    max_bytes=64, max_pixels=1 << 20, max_aspect_ratio=10, max_request_pixels=1 << 24
)


def reference(text: str) -> bytes | str:
    """What the gateway answered before the fast path: whitespace dropped, then the standard
    alphabet with validation (a str: the error code it refused with)."""
    if text.startswith("data:"):
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    if not text:
        return "invalid_image"
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return "invalid_base64"


def test_every_short_string_decodes_as_the_careful_path_would():
    checked = refused = 0
    for n in range(7):
        for chars in itertools.product("QA=+/ \n-é", repeat=n):
            text = "".join(chars)
            want = reference(text)
            try:
                got = decode_base64(text, "items[0].image", LIMITS)
            except ApiError as exc:
                assert exc.code == want, (text, exc.code)
                refused += 1
            else:
                assert got == want, text
            checked += 1
    assert checked > 500_000 and 0 < refused < checked


def test_line_wrapped_and_data_url_base64_are_accepted():
    data = bytes(range(48))
    wrapped = base64.encodebytes(data).decode()  # MIME: a newline every 76 characters
    assert "\n" in wrapped
    assert decode_base64(wrapped, "f", LIMITS) == data
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert decode_base64(url, "f", LIMITS) == data


@pytest.mark.parametrize(
    ("text", "status", "code"),
    [
        (base64.b64encode(bytes(65)).decode(), 413, "image_too_large"),  # over max_bytes
        ("A" * 200, 413, "image_too_large"),  # over max_encoded_chars before decoding
        ("", 422, "invalid_image"),
        ("QQ=", 422, "invalid_base64"),
    ],
)
def test_limits_and_refusals_name_the_field(text: str, status: int, code: str):
    with pytest.raises(ApiError) as caught:
        decode_base64(text, "items[3].image", LIMITS)
    assert (caught.value.status_code, caught.value.code, caught.value.field) == (
        status,
        code,
        "items[3].image",
    )
