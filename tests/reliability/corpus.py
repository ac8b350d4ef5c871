"""The bad-input corpus: every case generated in code (Pillow, struct, zlib), no binary blobs.

`CASES` lists (name, request, expectation). A request is JSON (a Python object, sent with
`json=`) or raw bytes with headers; the expectation is either a refusal (status, error code,
the field it names) or, where an input is acceptable and the README documents what happens to
it, the documented behaviour (scored, and equal to the image it stands for).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

PROMPT = "three red triangles on a grass background"
CONTRASTIVE = [
    "two red triangles on a grass background",
    "three blue triangles on a grass background",
]
# Limits of the corpus stack (small, so the oversize cases stay cheap).
MAX_REQUEST_BYTES = 2_000_000
MAX_IMAGE_BYTES = 400_000
MAX_IMAGE_PIXELS = 1024 * 1024
MAX_REQUEST_PIXELS = 3 * 1024 * 1024
MAX_ITEMS = 8
MAX_PROMPT_CHARS = 2000
STACK_SETTINGS = {
    "max_request_bytes": str(MAX_REQUEST_BYTES),
    "max_image_bytes": str(MAX_IMAGE_BYTES),
    "max_image_pixels": str(MAX_IMAGE_PIXELS),
    "max_request_pixels": str(MAX_REQUEST_PIXELS),
    "max_items_per_request": str(MAX_ITEMS),
    "max_prompt_chars": str(MAX_PROMPT_CHARS),
    "access_log": "true",  # so the log check below sees every request line
}


# -- images ----------------------------------------------------------------------------------------
def scene(size: tuple[int, int] = (64, 64), mode: str = "RGB") -> Image.Image:
    """A small deterministic picture (stripes and a block) in `mode`."""
    w, h = size
    image = Image.new("RGB", size, (40, 150, 60))
    for x in range(0, w, 8):
        image.paste((200, 40, 40), (x, 0, min(w, x + 3), h))
    image.paste((30, 30, 200), (w // 4, h // 4, w // 2 + 1, h // 2 + 1))
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD_PNG = encode(scene())
GOOD = b64(GOOD_PNG)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, bit_depth: int = 1, colour: int = 0) -> bytes:
    """A PNG whose header claims width × height, with one tiny IDAT (a header-only bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def corrupt_idat(data: bytes) -> bytes:
    """`data` (a PNG) with bytes in its IDAT chunk flipped (its CRC no longer matches)."""
    at = data.index(b"IDAT") + 12
    return data[:at] + bytes(b ^ 0xFF for b in data[at : at + 16]) + data[at + 16 :]


def cmyk_jpeg() -> bytes:
    return encode(scene().convert("CMYK"), "JPEG", quality=95)


def sixteen_bit_png() -> bytes:
    return encode(scene().convert("L").convert("I;16"), "PNG")


def animated(fmt: str) -> bytes:
    frames = [scene(), scene().rotate(90), scene().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> tuple[bytes, bytes]:
    """(the JPEG with EXIF orientation 6 = rotate 90°, the same pixels without EXIF)."""
    image = scene((64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", quality=95, exif=exif.tobytes()), encode(image, "JPEG", quality=95)


def noise_png(size: int) -> bytes:
    """A PNG that does not compress (random pixels): about 3 × size² bytes."""
    import os

    return encode(Image.frombytes("RGB", (size, size), os.urandom(3 * size * size)), "PNG")


HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<rect width="64" height="64"/></svg>'
)
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
HTML = b"<html><script>alert(1)</script></html>"


# -- cases -----------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    body: Any = None  # a JSON-able object (json=) unless `raw` is set
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/v1/score"
    method: str = "POST"
    status: int | tuple[int, ...] = 422  # a tuple: any of these (behaviour still settling)
    code: str | None = None
    field: str | None = None
    equals: bytes | None = None  # accepted: scores equal to this image's (same prompt)
    chunked: bool = False  # send the raw body without Content-Length
    http_layer: bool = False  # refused by the HTTP parser (uvicorn/h11), before the app: no JSON


def item(image: str = GOOD, prompt: str = PROMPT, **extra: Any) -> dict[str, Any]:
    return {"image": image, "prompt": prompt, "contrastive": CONTRASTIVE, **extra}


def score(*items: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"items": list(items), **extra}


def image_case(name: str, data: bytes | str, status: int, code: str | None, **kw: Any) -> Case:
    text = data if isinstance(data, str) else b64(data)
    return Case(name, score(item(text)), status=status, code=code, field="items[0].image", **kw)


def accepted(name: str, data: bytes | str, equals: bytes | None = None) -> Case:
    text = data if isinstance(data, str) else b64(data)
    return Case(name, score(item(text)), status=200, equals=equals)


def build_cases() -> list[Case]:
    png = GOOD_PNG
    jpeg = encode(scene(), "JPEG", quality=90)
    exif_jpeg, plain_jpeg = exif_rotated_jpeg()
    cases = [
        # images: truncated, corrupt, polyglot
        image_case("truncated-png", png[: len(png) // 2], 422, "invalid_image"),
        image_case("truncated-jpeg", jpeg[: len(jpeg) // 2], 422, "invalid_image"),
        image_case("png-magic-only", png[:8], 422, "invalid_image"),
        image_case("corrupt-png-idat", corrupt_idat(png), 422, "invalid_image"),
        image_case("png-magic-then-html", png[:8] + HTML, 422, "invalid_image"),
        image_case("jpeg-magic-then-zeros", b"\xff\xd8\xff" + b"\x00" * 200, 422, "invalid_image"),
        image_case(
            "webp-riff-garbage",
            b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 32,
            422,
            "invalid_image",
        ),
        image_case("html-then-png", HTML + png, 415, "unsupported_image_format"),
        accepted("png-with-trailing-html", png + HTML, equals=png),
        accepted("png-with-trailing-zip", png + b"PK\x03\x04" + b"\x00" * 64, equals=png),
        # decompression bombs and shapes
        image_case(
            "header-bomb-100k-x-100k", png_claiming(100_000, 100_000), 413, "image_too_many_pixels"
        ),
        image_case(
            "header-bomb-2g-pixels", png_claiming(65_535, 32_768), 413, "image_too_many_pixels"
        ),
        image_case(
            "real-bomb-4096-1bit",
            encode(Image.new("1", (4096, 4096)), "PNG"),
            413,
            "image_too_many_pixels",
        ),
        image_case("zero-width-png", png_claiming(0, 64), 422, "invalid_image"),
        image_case("1-x-2000", encode(scene((1, 2000))), 422, "image_aspect_ratio"),
        image_case("2000-x-1", encode(scene((2000, 1))), 422, "image_aspect_ratio"),
        accepted("1-x-1", encode(scene((1, 1)))),
        Case(
            "request-pixels-over-budget",
            score(*[item(b64(encode(Image.new("RGB", (1000, 1000), (9, 9, 9)))))] * 4),
            status=413,
            code="request_too_many_pixels",
            field="items[3].image",
        ),
        image_case("image-over-byte-limit", noise_png(400), 413, "image_too_large"),
        # modes: converted to RGB as CLIP's processor does
        accepted("cmyk-jpeg", cmyk_jpeg()),
        accepted("16-bit-png", sixteen_bit_png()),
        accepted("palette-png", encode(scene().convert("P"))),
        accepted("rgba-png", encode(scene().convert("RGBA")), equals=png),
        accepted("la-png", encode(scene().convert("LA"))),
        accepted("grayscale-png", encode(scene().convert("L"))),
        accepted("1-bit-png", encode(scene().convert("1"))),
        accepted("progressive-jpeg", encode(scene(), "JPEG", progressive=True)),
        accepted("animated-png-first-frame", animated("PNG"), equals=png),
        accepted("animated-webp-first-frame", animated("WEBP")),
        accepted("exif-rotated-jpeg-as-stored", exif_jpeg, equals=plain_jpeg),
        accepted("data-url-prefix", "data:image/png;base64," + GOOD, equals=png),
        accepted(
            "mime-wrapped-base64",
            "\n".join(GOOD[i : i + 76] for i in range(0, len(GOOD), 76)),
            equals=png,
        ),
        # formats not accepted
        image_case("gif", encode(scene(), "GIF"), 415, "unsupported_image_format"),
        image_case("animated-gif", animated("GIF"), 415, "unsupported_image_format"),
        image_case("tiff", encode(scene(), "TIFF"), 415, "unsupported_image_format"),
        image_case("bmp", encode(scene(), "BMP"), 415, "unsupported_image_format"),
        image_case("ico", encode(scene(), "ICO"), 415, "unsupported_image_format"),
        image_case("heic", HEIC, 415, "unsupported_image_format"),
        image_case("svg", SVG, 415, "unsupported_image_format"),
        image_case("pdf", PDF, 415, "unsupported_image_format"),
        # base64
        image_case("base64-bad-characters", "!!!!" * 8, 422, "invalid_base64"),
        image_case("base64-bad-padding", GOOD[:-1], 422, "invalid_base64"),
        image_case(
            "base64-urlsafe-alphabet",
            GOOD.replace("+", "-").replace("/", "_") + "-_",
            422,
            "invalid_base64",
        ),
        image_case("base64-non-ascii", GOOD[:20] + "✓é" + GOOD[20:], 422, "invalid_base64"),
        image_case("base64-empty", "", 422, "invalid_image"),
        image_case("base64-padding-only", "====", 422, "invalid_base64"),
        # wrong types at every field
        Case("items-not-a-list", {"items": item()}, field="items"),
        Case("items-empty", {"items": []}, field="items"),
        Case("items-missing", {"textnorm": {}}, field="items"),
        Case("item-not-an-object", {"items": ["x"]}, field="items[0]"),
        Case("image-an-int", score(item(7)), field="items[0].image"),  # type: ignore[arg-type]
        Case("image-null", score(item(None)), field="items[0].image"),  # type: ignore[arg-type]
        Case("prompt-an-int", score(item(prompt=7)), field="items[0].prompt"),  # type: ignore[arg-type]
        Case("prompt-a-list", score(item(prompt=[PROMPT])), field="items[0].prompt"),  # type: ignore[arg-type]
        Case("prompt-missing", {"items": [{"image": GOOD}]}, field="items[0].prompt"),
        Case("unknown-item-field", score(item(scle=5)), field="items[0].scle"),
        Case("unknown-top-field", score(item(), scale=5), field="scale"),
        Case("contrastive-a-string", score(item(contrastive="x")), field="items[0].contrastive"),
        Case("contrastive-ints", score(item(contrastive=[1, 2])), field="items[0].contrastive[0]"),
        Case("textnorm-a-list", score(item(), textnorm=[]), field="textnorm"),
        Case("scale-a-string", score(item(), textnorm={"scale": "abc"}), field="textnorm.scale"),
        Case(
            "scale-nan",
            raw=b'{"items": [ITEM], "textnorm": {"scale": NaN}}',
            status=400,  # strict JSON: NaN is not JSON
            code="malformed_json",
            field="body",
        ),
        Case(
            "scale-infinity",
            raw=b'{"items": [ITEM], "textnorm": {"scale": Infinity}}',
            status=400,
            code="malformed_json",
            field="body",
        ),
        Case(
            "scale-1e400",
            raw=b'{"items": [ITEM], "textnorm": {"scale": 1e400}}',
            field="textnorm.scale",
        ),
        Case(
            "scale-huge-int",
            raw=b'{"items": [ITEM], "textnorm": {"scale": 1' + b"0" * 400 + b"}}",
            field="textnorm.scale",
        ),
        Case("scale-negative", score(item(), textnorm={"scale": -1}), field="textnorm.scale"),
        Case("scale-zero", score(item(), textnorm={"scale": 0}), field="textnorm.scale"),
        Case(
            "lambda-negative",
            score(item(), textnorm={"ensemble_lambda": -0.5}),
            field="textnorm.ensemble_lambda",
        ),
        Case("rule-unknown", score(item(), textnorm={"rule": "bogus"}), field="textnorm.rule"),
        Case(
            "allow-missing-a-list",
            score(item(), textnorm={"allow_missing": [1]}),
            field="textnorm.allow_missing",
        ),
        Case("request-id-with-space", score(item(), request_id="a b"), field="request_id"),
        Case("request-id-too-long", score(item(), request_id="r" * 200), field="request_id"),
        Case("request-id-an-int", score(item(), request_id=5), field="request_id"),
        Case("prompt-set-malformed", score(item(prompt_set="ps_xyz")), field="items[0].prompt_set"),
        Case(
            "prompt-set-unknown",
            score({"image": GOOD, "prompt": PROMPT, "prompt_set": "ps_" + "a" * 32}),
            code="unknown_prompt_set",
            field="items[0].prompt_set",
        ),
        # prompts
        Case("prompt-empty", score(item(prompt="")), code="empty_prompt", field="items[0].prompt"),
        Case(
            "prompt-whitespace",
            score(item(prompt=" \t\n ")),
            code="empty_prompt",
            field="items[0].prompt",
        ),
        Case(
            "prompt-over-max-chars",
            score(item(prompt="a" * (MAX_PROMPT_CHARS + 1))),
            code="prompt_too_many_characters",
            field="items[0].prompt",
        ),
        Case(
            "prompt-over-77-tokens",
            score(item(prompt="red triangle " * 60)),
            code="prompt_too_long",
            field="items[0].prompt",
        ),
        Case(
            "prompt-combining-marks",
            score(item(prompt="a" + "\u0301\u0323\u0334" * 400)),
            code="prompt_too_long",
            field="items[0].prompt",
        ),
        Case(  # special tokens match before normalising: a cache key must not pair these
            "prompt-special-token-other-case",
            score(item(prompt="three red triangles<|ENDOFTEXT|> on a grass background")),
            code="special_token_in_prompt",
            field="items[0].prompt",
        ),
        Case(
            "contrastive-special-token",
            score(item(contrastive=[CONTRASTIVE[0], "two red triangles<|endoftext|>"])),
            code="special_token_in_prompt",
            field="items[0].contrastive[1]",
        ),
        Case(
            "prompt-lone-surrogate",
            raw=raw_score_with(prompt="three red \\ud800 triangles"),
            status=400,
            code="malformed_json",
            field="items[0].prompt",
        ),
        Case(
            "contrastive-lone-surrogate",
            raw=raw_score_with(contrastive='["two red \\udfff triangles"]'),
            status=400,
            code="malformed_json",
            field="items[0].contrastive[0]",
        ),
        Case(
            "contrastive-over-max-chars",
            score(item(contrastive=["b" * (MAX_PROMPT_CHARS + 1)])),
            code="prompt_too_many_characters",
            field="items[0].contrastive[0]",
        ),
        Case(
            "too-many-contrastive",
            score(item(contrastive=[f"{i} red triangles" for i in range(33)])),
            code="too_many_contrastive_prompts",
            field="items[0].contrastive",
        ),
        Case(
            "too-many-items",
            score(*[item()] * (MAX_ITEMS + 1)),
            code="too_many_items",
            field="items",
        ),
        # the group endpoint
        Case(
            "group-no-images",
            {"prompt": PROMPT, "images": []},
            path="/v1/score/group",
            field="images",
        ),
        Case(
            "group-too-many-images",
            {"prompt": PROMPT, "images": [GOOD] * (MAX_ITEMS + 1)},
            path="/v1/score/group",
            code="too_many_items",
            field="images",
        ),
        Case(
            "group-image-bad-base64",
            {"prompt": PROMPT, "images": [GOOD, "@@@@"]},
            path="/v1/score/group",
            code="invalid_base64",
            field="images[1]",
        ),
        Case(
            "group-advantage-of-unknown",
            {"prompt": PROMPT, "images": [GOOD], "advantages": True, "advantage_of": "bogus"},
            path="/v1/score/group",
            field="advantage_of",
        ),
        Case(
            "group-advantage-eps-nan",
            raw=b'{"prompt": "a red circle", "images": ["'
            + GOOD.encode()
            + b'"], "advantage_eps": NaN}',
            path="/v1/score/group",
            status=400,
            code="malformed_json",
            field="body",
        ),
        Case(  # a group of equal rewards has std 0: 0 / 0 is no advantage
            "group-advantage-eps-zero",
            {"prompt": PROMPT, "images": [GOOD], "advantage_eps": 0},
            path="/v1/score/group",
            field="advantage_eps",
        ),
        # prompt sets
        Case(
            "prompt-set-create-empty-contrastive",
            {"prompt": PROMPT, "contrastive": []},
            path="/v1/prompt-sets",
            field="contrastive",
        ),
        Case(
            "prompt-set-import-not-an-object",
            raw=b'["a", "b"]',
            path="/v1/prompt-sets/import",
            code="invalid_prompt_sets",
            field="body",
        ),
        Case(
            "prompt-set-get-unknown",
            path="/v1/prompt-sets/ps_" + "f" * 32,
            method="GET",
            status=404,
            code="prompt_set_not_found",
            field="id",
        ),
        # the body itself
        Case("not-json", raw=b"items=1", status=400, code="malformed_json"),
        Case(  # over CPython's int-conversion limit (4300 digits)
            "json-integer-5000-digits",
            raw=b'{"items": ' + b"7" * 5000 + b"}",
            status=400,
            code="malformed_json",
            field="body",
        ),
        Case(
            "prompt-set-import-lone-surrogate",
            raw=b'{"three red triangles": ["two red \\ud800 triangles"]}',
            path="/v1/prompt-sets/import",
            status=400,
            code="malformed_json",
            field="three red triangles[0]",
        ),
        Case("json-truncated", raw=b'{"items": [', status=400, code="malformed_json"),
        Case(
            "invalid-utf8",
            raw=b'{"items": [{"image": "\xff\xfe", "prompt": "x"}]}',
            status=400,
            code="malformed_json",
        ),
        Case("body-empty", raw=b"", field=None),
        Case("body-null", raw=b"null", field=None),
        Case("body-a-list", raw=b"[]", field=None),
        Case(
            "json-nested-100k-deep",
            raw=b"[" * 100_000 + b"]" * 100_000,
            status=400,
            code="malformed_json",
        ),
        Case(
            "wrong-content-type",
            raw=b'{"items": []}',
            headers={"Content-Type": "text/plain"},
            status=415,
            code="unsupported_media_type",
            field="Content-Type",
        ),
        Case(
            "form-content-type",
            raw=b"items=1",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            status=415,
            code="unsupported_media_type",
            field="Content-Type",
        ),
        Case(
            "group-wrong-content-type",
            raw=b'{"prompt": "a red circle", "images": ["x"]}',
            headers={"Content-Type": "text/csv"},
            path="/v1/score/group",
            status=415,
            code="unsupported_media_type",
            field="Content-Type",
        ),
        Case(
            "gzip-not-decoded",
            raw=zlib.compress(b'{"items": []}'),
            headers={"Content-Encoding": "gzip"},
            status=400,
            code="malformed_json",
        ),
        Case(
            "oversize-with-content-length",
            raw=b"{" + b" " * MAX_REQUEST_BYTES + b"}",
            status=413,
            code="request_too_large",
            field="body",
        ),
        Case(
            "oversize-chunked",
            raw=b"{" + b" " * MAX_REQUEST_BYTES + b"}",
            chunked=True,
            status=413,
            code="request_too_large",
            field="body",
        ),
        Case(
            "content-length-not-a-number",
            raw=b"{}",
            headers={"Content-Length": "abc"},
            status=400,
            http_layer=True,
        ),
        Case(
            "duplicate-top-level-key",
            raw=b'{"items": [ITEM], "items": [ITEM]}',
            status=400,
            code="malformed_json",
            field="body",
        ),
        Case(
            "duplicate-key-in-item",
            raw=b'{"items": [{"image": "x", "prompt": "a red circle", "prompt": "a blue square"}]}',
            status=400,
            code="malformed_json",
            field="body",
        ),
        Case(
            "duplicate-key-in-textnorm",
            raw=b'{"items": [ITEM], "textnorm": {"scale": 1, "scale": 100}}',
            status=400,
            code="malformed_json",
            field="body",
        ),
        Case(
            "wrong-method",
            path="/v1/score",
            method="PUT",
            raw=b"{}",
            status=405,
            code="method_not_allowed",
        ),
        Case("unknown-path", path="/v1/scores", raw=b"{}", status=404, code="not_found"),
    ]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be distinct"
    return cases


def raw_score_with(prompt: str = PROMPT, contrastive: str | None = None) -> bytes:
    """A one-item score body written by hand, so a string can hold what json.dumps would not
    write: `prompt` and `contrastive` (a JSON list) go in verbatim."""
    listed = contrastive if contrastive is not None else json.dumps(CONTRASTIVE)
    return (
        f'{{"items": [{{"image": "{GOOD}", "prompt": "{prompt}", "contrastive": {listed}}}]}}'
    ).encode()


def raw_item() -> bytes:
    """The one JSON item spliced into raw bodies at `ITEM`."""
    return json.dumps(item()).encode()
