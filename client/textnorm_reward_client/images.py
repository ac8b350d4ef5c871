"""Images as trainers have them → items on the wire.

Accepted, per item or as a batch:
- encoded PNG/JPEG/WebP `bytes` (or bytearray/memoryview), or a path (`str` / `Path`) to such
  a file: sent as base64, untouched;
- a PIL image: PNG-encoded, sent as base64;
- a numpy array `[H, W, 3]` (or a batch `[N, H, W, 3]`), uint8, or float in [0, 1];
- a torch tensor `[3, H, W]` (or `[N, 3, H, W]`), uint8, or float in [0, 1].
Floats become uint8 by round(clip(x, 0, 1) × 255), computed in float32 or wider; NaN is
refused. Arrays and tensors go as the raw-tensor
JSON form (`{"shape": [H, W, 3], "dtype": "uint8", "data": base64}`: no PNG cost) when the
service accepts it, else as PNG (Pillow needed then).

Kinds are recognised by duck typing and `type(x).__module__`: numpy, Pillow and torch are never
imported for inputs that are not theirs (torch is never imported at all: a tensor is converted
with its own methods).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

ENCODED = (bytes, bytearray, memoryview)


def _module(x: object) -> str:
    return type(x).__module__ or ""


def is_torch_tensor(x: object) -> bool:
    return _module(x).startswith("torch") and hasattr(x, "detach") and hasattr(x, "permute")


def is_numpy_array(x: object) -> bool:
    return _module(x) == "numpy" and hasattr(x, "shape") and hasattr(x, "dtype")


def is_pil_image(x: object) -> bool:
    return _module(x).startswith("PIL.") and hasattr(x, "save") and hasattr(x, "size")


def _tensor_to_hwc_uint8(t: Any, copy: bool = False) -> np.ndarray:
    """[3, H, W] or [N, 3, H, W] tensor (uint8, or float in [0, 1]) → uint8 channels-last
    (`copy`: never sharing the tensor's memory)."""
    t = t.detach()
    if t.ndim not in (3, 4) or t.shape[-3] != 3:
        raise ValueError(f"a torch image must be [3, H, W] or [N, 3, H, W], got {tuple(t.shape)}")
    if t.is_floating_point():
        t = t.float()
        if bool(t.isnan().any()):
            raise ValueError("a torch image holds NaN pixels")
        t = t.clamp(0, 1).mul(255).round()  # out of place: the caller's tensor is kept
    elif str(t.dtype) != "torch.uint8":
        raise ValueError(f"a torch image must be uint8 or float in [0, 1], got {t.dtype}")
    order = (0, 2, 3, 1) if t.ndim == 4 else (1, 2, 0)
    out = t.byte().permute(*order).contiguous().cpu().numpy()
    if copy and not t.is_floating_point() and t.device.type == "cpu":
        import numpy as np

        # channels-last memory: permute + contiguous was a view of the caller's tensor
        if np.may_share_memory(out, t.numpy()):
            out = out.copy()
    return out


def _array_to_uint8(a: Any, copy: bool = False) -> np.ndarray:
    import numpy as np

    a = np.asarray(a)
    if a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"an image array must be [H, W, 3] or [N, H, W, 3], got {a.shape}")
    if a.dtype == np.uint8:
        return a.copy() if copy else a
    if a.dtype.kind == "f":
        if np.isnan(a).any():
            raise ValueError("an image array holds NaN pixels")
        # in float32 at least: float16 arithmetic would round x × 255 one level off
        wide = a.astype(np.promote_types(a.dtype, np.float32), copy=False)
        return np.rint(np.clip(wide, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"an image array must be uint8 or float in [0, 1], got {a.dtype}")


def expand(images: Any, copy: bool = False) -> list[Any]:
    """One entry per item: encoded bytes, a Path, a PIL image, or a uint8 [H, W, 3] array.

    Tensors are converted here, on the caller's thread (one device→host copy per batch). uint8
    numpy and CPU tensor inputs are kept as views unless `copy` (the async client: its caller
    may reuse the buffers, or overwrite the files, before the call is awaited); PIL images are
    copied then too, and files read."""
    if isinstance(images, ENCODED + (str, Path)) or is_pil_image(images):
        return [_one(images, copy)]
    if is_torch_tensor(images) or is_numpy_array(images) or hasattr(images, "__array__"):
        if is_torch_tensor(images):
            batch = _tensor_to_hwc_uint8(images, copy)
        else:
            batch = _array_to_uint8(images, copy)
        return list(batch) if batch.ndim == 4 else [batch]
    if not isinstance(images, list | tuple):
        return [_one(images, copy)]  # not a sequence of images: refused there, type named
    out: list[Any] = []
    for image in images:
        out += expand(image, copy) if _batch_like(image) else [_one(image, copy)]
    return out


def _batch_like(x: object) -> bool:
    return (is_torch_tensor(x) or is_numpy_array(x)) and len(x.shape) == 4  # type: ignore[attr-defined]


def _one(x: Any, copy: bool = False) -> Any:
    if isinstance(x, ENCODED):
        return bytes(x)
    if isinstance(x, str | Path):
        return Path(x).read_bytes() if copy else Path(x)  # copy: the file as it is now
    if is_pil_image(x):
        return x.copy() if copy else x
    if is_torch_tensor(x):
        return _tensor_to_hwc_uint8(x, copy)
    if is_numpy_array(x) or hasattr(x, "__array__"):
        array = _array_to_uint8(x, copy)
        if array.ndim != 3:
            raise ValueError(f"one image must be [H, W, 3], got {array.shape}")
        return array
    raise TypeError(
        f"unsupported image type {type(x).__module__}.{type(x).__name__}: give encoded bytes, "
        "a path, a PIL image, a numpy [H, W, 3] array or a torch [3, H, W] tensor"
    )


@dataclass(frozen=True)
class WireImage:
    value: str | dict[str, Any]  # base64 string, or the raw-tensor object
    pixels: int  # width × height (0 when unknown: encoded bytes without Pillow installed)
    chars: int  # characters it adds to the JSON body


def _b64(data: bytes | memoryview) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(array: np.ndarray) -> bytes:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            "the service does not accept raw tensors, and sending an array as PNG needs "
            "Pillow: pip install Pillow"
        ) from None

    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, "PNG")
    return buf.getvalue()


def _header_pixels(data: bytes) -> int:
    try:
        from PIL import Image
    except ImportError:
        return 0
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return image.size[0] * image.size[1]
    except Exception:  # not an image: the service answers with the field named
        return 0


def resized(array: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size` (bicubic, aspect kept), as CLIP's processor resizes; images
    already at or under `size` are returned as they are."""
    import numpy as np
    from PIL import Image

    h, w = array.shape[:2]
    if min(h, w) <= size:
        return array
    scale = size / min(h, w)
    target = (max(size, round(w * scale)), max(size, round(h * scale)))
    return np.asarray(Image.fromarray(array, "RGB").resize(target, Image.Resampling.BICUBIC))


def to_rgb(image: Any) -> Any:
    """A PIL image as CLIP's image processor sees it, in RGB: transparency (an alpha band or
    a transparent colour) composited onto white, as transformers' `convert_to_rgb` does. A
    plain `convert("RGB")` would drop the alpha and show the colours hidden under it."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image if image.mode == "RGB" else image.convert("RGB")  # RGB: no copy
    from PIL import Image

    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _decoded(image: Any) -> np.ndarray:
    import numpy as np
    from PIL import Image

    if not is_pil_image(image):
        data = image.read_bytes() if isinstance(image, Path) else image
        image = Image.open(io.BytesIO(data))
    return np.asarray(to_rgb(image))


def to_wire(image: Any, *, raw: bool, resize_to: int | None = None) -> WireImage:
    """One expanded item → its JSON value. raw: the service accepts the raw-tensor form;
    resize_to: the model's input size, to resize larger images to on this side (or None)."""
    if resize_to is not None:
        array = image if is_numpy_array(image) else _decoded(image)
        if array is not image and min(array.shape[:2]) <= resize_to:
            pass  # encoded and small already: send the file as it is
        else:
            image = resized(array, resize_to)
    if isinstance(image, bytes | Path):
        data = image.read_bytes() if isinstance(image, Path) else image
        text = _b64(data)
        return WireImage(text, _header_pixels(data), len(text))
    if is_pil_image(image):
        buf = io.BytesIO()
        to_rgb(image).save(buf, "PNG")
        text = _b64(buf.getvalue())
        return WireImage(text, image.size[0] * image.size[1], len(text))
    import numpy as np

    array = np.ascontiguousarray(image)
    h, w = array.shape[:2]
    if raw:
        data = _b64(memoryview(array).cast("B"))
        value = {"shape": [h, w, 3], "dtype": "uint8", "data": data}
        return WireImage(value, h * w, len(data) + 48)
    text = _b64(_png(array))
    return WireImage(text, h * w, len(text))
