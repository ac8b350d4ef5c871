"""CLIP image preprocessing as an ONNX graph (opset 18), matching `CLIPImageProcessorPil`.

`build_preprocess_model(processor)` returns a model that takes `IMAGE`, uint8 RGB images
[batch, height, width, 3] of any size (one size per batch), and returns `PIXEL_VALUES`, float32
[batch, 3, crop_height, crop_width], computed as transformers' PIL backend computes it:

1. Resize: the shortest side to S = `size["shortest_edge"]`, the other to `int(S * long / short)`
   (exact int64 product, float64 division, truncation: what Python does), with Pillow's bicubic
   filter. Pillow resamples a uint8 image in two one-axis passes, each rounding and clipping to
   0..255, and skips a pass whose size does not change.
2. Pass order matters: the wrong one is off by 10+ grey levels on tall images. Pillow 13 runs
   the vertical pass first iff the height shrinks and H - newH > 2 * (W - newW), else the
   horizontal pass first (measured on Pillow 13.0.0 over ~5,000 size pairs, exact ties included;
   Pillow 12 always runs horizontal first). The order depends on the runtime shape: an `If`
   node picks it. Each branch lays the image out so that the resampled axis is axis 2.
3. Centre crop at transformers' offsets ((size - crop) // 2). Where the resized image is smaller
   than the crop (only possible when the crop exceeds S) it is zero-padded as transformers does
   (ceil(deficit / 2) before, the rest after), before normalisation: padding is -mean / std.
4. Rescale (float64 multiply, then float32, as `transformers.image_transforms.rescale`) and
   normalise ((x - mean) / std in float32): both depend on the grey level and channel only, so
   they are a 3 x 256 table, computed with numpy exactly as transformers computes them.

Two ways to resample (`exact=`):

- `exact=True` (default) reproduces Pillow's arithmetic: the filter weights in float64 as in
  `precompute_coeffs`, quantised to 22-bit integers as in `normalize_coeffs_8bpc`, int32
  accumulation with Pillow's rounding offset, `>> 22` and clip. A `Loop` over the filter taps
  gathers whole lines and accumulates. The output is bit-identical to `CLIPImageProcessorPil`.
- `exact=False` uses ONNX `Resize` (cubic, antialias=1, cubic_coeff_a=-0.5, exclude_outside=1,
  half_pixel: Pillow's support-scaled, renormalised window) on float32, then floor(x + 0.5)
  and clip after each pass. It is 2-3x faster on large images on ONNX Runtime's CPU provider,
  but ORT computes the weights in float32, so roughly 1 value in 5,000 per pass rounds the
  other way. Most images stay within 1 grey level; about 1 random-noise image in 60 at 224 px
  has a value 2 levels off, and flat-colour images more often.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    from transformers import CLIPImageProcessorPil

INPUT_NAME = "IMAGE"
OUTPUT_NAME = "PIXEL_VALUES"
OPSET = 18
# torch.onnx.export (dynamo) writes IR 10; onnx.compose.merge_models needs equal IR versions.
IR_VERSION = 10
PIL_BICUBIC = 3
PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling (32 - 8 - 2)
SWAP_LAST_AXES = [0, 1, 3, 2]
IMAGE_DIMS = [None, 3, None, None]  # the shape of images inside the graph: NCHW

# `CLIPImageProcessorPil`'s class defaults, used for keys a config dict leaves out.
CLIP_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": PIL_BICUBIC,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": (0.48145466, 0.4578275, 0.40821073),
    "image_std": (0.26862954, 0.26130258, 0.27577711),
    "do_convert_rgb": True,
    "do_pad": False,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """The processor settings the graph implements."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    rescale_factor: float | None  # None: no rescaling
    image_mean: tuple[float, float, float] | None  # None: no normalisation
    image_std: tuple[float, float, float] | None


# --------------------------------------------------------------------------- configuration


def _setting(processor: Any, key: str) -> Any:
    """One processor setting, from an attribute or a dict key; CLIP's default when unset."""
    is_dict = isinstance(processor, Mapping)
    value = processor.get(key) if is_dict else getattr(processor, key, None)
    return CLIP_DEFAULTS[key] if value is None else value


def _size_dict(value: Any, name: str, square: bool) -> dict[str, int]:
    """A size setting as a plain dict. An int means a square for `crop_size` and the shortest
    edge for `size`, as CLIP's processor reads them (`default_to_square=False`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    try:
        return {k: v for k, v in dict(value).items() if v is not None}
    except (TypeError, ValueError):
        raise ValueError(f"unsupported {name}={value!r}: expected an int or a dict") from None


def _three(value: Any, name: str) -> tuple[float, float, float]:
    """A per-channel setting (a single number is used for all three channels)."""
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"unsupported {name}={value!r}: expected 3 values (RGB)")
    return values[0], values[1], values[2]


def read_config(processor: CLIPImageProcessorPil | Mapping[str, Any]) -> PreprocessConfig:
    """Check that the graph can reproduce `processor` exactly; return its settings."""
    backend = getattr(processor, "backend", "pil")
    if backend != "pil":
        raise ValueError(f"unsupported image processor backend {backend!r}: only 'pil' is matched")
    for flag in ("do_resize", "do_center_crop"):
        if not _setting(processor, flag):
            raise ValueError(f"unsupported {flag}=False: the output size would vary per image")
    if _setting(processor, "do_pad"):
        raise ValueError("unsupported do_pad=True")
    resample = _setting(processor, "resample")
    if not isinstance(resample, int) or int(resample) != PIL_BICUBIC:
        raise ValueError(f"unsupported resample={resample!r}: only PIL bicubic (3) is implemented")

    size = _size_dict(_setting(processor, "size"), "size", square=False)
    if set(size) != {"shortest_edge"}:
        raise ValueError(f"unsupported size={size}: only {{'shortest_edge': S}} is implemented")
    crop = _size_dict(_setting(processor, "crop_size"), "crop_size", square=True)
    if set(crop) != {"height", "width"}:
        raise ValueError(f"unsupported crop_size={crop}: expected {{'height': H, 'width': W}}")
    sizes = (size["shortest_edge"], crop["height"], crop["width"])
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(f"unsupported size={size}, crop_size={crop}: need positive integers")

    do_rescale = _setting(processor, "do_rescale")
    rescale = float(_setting(processor, "rescale_factor")) if do_rescale else None
    mean = std = None
    if _setting(processor, "do_normalize"):
        mean = _three(_setting(processor, "image_mean"), "image_mean")
        std = _three(_setting(processor, "image_std"), "image_std")
    return PreprocessConfig(*sizes, rescale_factor=rescale, image_mean=mean, image_std=std)


# --------------------------------------------------------------------------- graph building


class _Builder:
    """Collects the nodes and constants of one (sub)graph and names every value uniquely."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def const(self, hint: str, value: Any, dtype: type | np.dtype) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: Iterable[str], hint: str | None = None, **attrs: Any) -> str:
        output = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attrs))
        return output

    def graph(
        self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
    ) -> onnx.GraphProto:
        """These nodes as a subgraph (a branch or a loop body)."""
        name = self.prefix.rstrip("/")
        return helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)


def _value(name: str, dtype: int, shape: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _resized_size(b: _Builder, height: str, width: str, shortest_edge: int) -> tuple[str, str]:
    """transformers' `get_resize_output_image_size(default_to_square=False)`, in-graph.

    new_long = int(S * long / short): an exact int64 product, a correctly rounded float64
    division (as Python's), then Floor (= truncation, the sides being positive).
    Returns (new_height, new_width) as int64 [1] tensors.
    """
    s = b.const("shortest_edge", [shortest_edge], np.int64)
    short, long = b.op("Min", [height, width], "short"), b.op("Max", [height, width], "long")
    numerator = b.op("Cast", [b.op("Mul", [long, s])], to=TensorProto.DOUBLE)
    denominator = b.op("Cast", [short], to=TensorProto.DOUBLE)
    quotient = b.op("Floor", [b.op("Div", [numerator, denominator])])
    new_long = b.op("Cast", [quotient], "new_long", to=TensorProto.INT64)
    portrait = b.op("LessOrEqual", [width, height], "portrait")
    new_height = b.op("Where", [portrait, new_long, s], "new_height")
    new_width = b.op("Where", [portrait, s, new_long], "new_width")
    return new_height, new_width


def _vertical_first(b: _Builder, height: str, width: str, new_height: str, new_width: str) -> str:
    """Pillow 13's pass order: vertical first iff newH < H and H - newH > 2 * (W - newW)."""
    two = b.const("two", [2], np.int64)
    shrinks = b.op("Less", [new_height, height], "height_shrinks")
    height_cut = b.op("Sub", [height, new_height])
    width_cut_x2 = b.op("Mul", [b.op("Sub", [width, new_width]), two])
    larger = b.op("Greater", [height_cut, width_cut_x2])
    return b.op("Squeeze", [b.op("And", [shrinks, larger])], "vertical_first")


# ------------------------------------------------------------- exact: Pillow's own arithmetic


def _bicubic(b: _Builder, t: str) -> str:
    """Pillow's `bicubic_filter` (a = -0.5) in float64, its operations in its order."""
    c = {v: b.const("k", v, np.float64) for v in (0.0, 1.0, 1.5, 2.0, 2.5, 4.0, 5.0, 8.0, -0.5)}
    x = b.op("Abs", [t])
    # |x| < 1: ((a + 2) * x - (a + 3)) * x * x + 1
    near = b.op("Sub", [b.op("Mul", [c[1.5], x]), c[2.5]])
    near = b.op("Add", [b.op("Mul", [b.op("Mul", [near, x]), x]), c[1.0]])
    # |x| < 2: (((x - 5) * x + 8) * x - 4) * a
    far = b.op("Add", [b.op("Mul", [b.op("Sub", [x, c[5.0]]), x]), c[8.0]])
    far = b.op("Mul", [b.op("Sub", [b.op("Mul", [far, x]), c[4.0]]), c[-0.5]])
    outer = b.op("Where", [b.op("Less", [x, c[2.0]]), far, c[0.0]])
    return b.op("Where", [b.op("Less", [x, c[1.0]]), near, outer], "filter")


def _pillow_coefficients(b: _Builder, in_size: str, out_size: str) -> tuple[str, str, str]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis, in-graph.

    Output pixel i: center = (i + 0.5) * scale; taps x in [xmin, xmax) with
    xmin = max(int(center - support + 0.5), 0), xmax = min(int(center + support + 0.5), in);
    weights filter((x - center + 0.5) / filterscale), normalised to sum 1, then quantised to
    22 bits, rounding half away from zero. Returns (tap count int64 scalar, input indices int64
    [out, window], weights int32 [out, window]); unused taps get weight 0 and a valid index.
    """
    f64 = TensorProto.DOUBLE
    zero, half, one, two = (b.const("k", v, np.float64) for v in (0.0, 0.5, 1.0, 2.0))
    n, m = b.op("Cast", [in_size], to=f64), b.op("Cast", [out_size], to=f64)
    scale = b.op("Div", [n, m], "scale")
    filterscale = b.op("Max", [scale, one], "filterscale")
    support = b.op("Mul", [two, filterscale], "support")
    window = b.op("Add", [b.op("Mul", [b.op("Ceil", [support]), two]), one])  # Pillow's ksize
    window = b.op("Cast", [window], "window", to=TensorProto.INT64)

    start, step, axis1 = (
        b.const("k", 0, np.int64),
        b.const("k", 1, np.int64),
        b.const("k", [1], np.int64),
    )
    out_index = b.op("Cast", [b.op("Range", [start, b.op("Squeeze", [out_size]), step])], to=f64)
    tap_index = b.op("Cast", [b.op("Range", [start, b.op("Squeeze", [window]), step])], to=f64)
    center = b.op("Mul", [b.op("Add", [out_index, half]), scale])
    center = b.op("Unsqueeze", [center, axis1], "center")  # [out, 1]
    xmin = b.op("Floor", [b.op("Add", [b.op("Sub", [center, support]), half])])
    xmin = b.op("Max", [xmin, zero], "xmin")  # int() truncates; negatives clamp to 0 anyway
    xmax = b.op("Floor", [b.op("Add", [b.op("Add", [center, support]), half])])
    xmax = b.op("Min", [xmax, n], "xmax")
    x = b.op("Add", [xmin, tap_index], "x")  # [out, window]

    inv_filterscale = b.op("Div", [one, filterscale])
    t = b.op("Mul", [b.op("Add", [b.op("Sub", [x, center]), half]), inv_filterscale])
    weight = b.op("Where", [b.op("Less", [x, xmax]), _bicubic(b, t), zero])
    total = b.op("ReduceSum", [weight, axis1], keepdims=1)
    total = b.op("Where", [b.op("Equal", [total, zero]), one, total])  # Pillow: skip if 0
    fixed = b.const("k", 2.0**PRECISION_BITS, np.float64)
    scaled = b.op("Mul", [b.op("Div", [weight, total]), fixed])
    negative = b.op("Less", [scaled, zero])
    away_from_zero = (
        b.op("Ceil", [b.op("Sub", [scaled, half])]),
        b.op("Floor", [b.op("Add", [scaled, half])]),
    )
    weights = b.op(
        "Cast", [b.op("Where", [negative, *away_from_zero])], "weights", to=TensorProto.INT32
    )
    indices = b.op("Min", [x, b.op("Sub", [n, one])])
    indices = b.op("Cast", [indices], "indices", to=TensorProto.INT64)
    # The Loop runs over the widest window actually used (Pillow's ksize can be 1-2 wider).
    used = b.op("ReduceMax", [b.op("Sub", [xmax, xmin])], keepdims=0)
    taps = b.op("Cast", [used], "taps", to=TensorProto.INT64)
    return taps, indices, weights


def _accumulate_taps(b: _Builder, image: str, size: str, coefficients: tuple[str, str, str]) -> str:
    """`ImagingResampleVertical_8bpc` along axis 2 of an int32 [N, 3, lines, X] image:
    out = clip8((2^21 + sum over taps of pixel * weight) >> 22), exactly.

    A Loop over the filter taps gathers whole input lines (contiguous memory) and accumulates
    in int32, Pillow's own accumulator type; memory stays at one output-sized buffer."""
    taps, indices, weights = coefficients
    before, after = b.op("Shape", [image], start=0, end=2), b.op("Shape", [image], start=3)
    out_shape = b.op("Concat", [before, size, after], "out_shape", axis=0)
    rounding = helper.make_tensor("rounding", TensorProto.INT32, [1], [1 << (PRECISION_BITS - 1)])
    acc0 = b.op("ConstantOfShape", [out_shape], "acc0", value=rounding)

    body = _Builder(f"{b.prefix}tap/")
    tap, cond, acc = body.name("tap"), body.name("cond"), body.name("acc")
    line = body.op("Gather", [indices, tap], "line", axis=1)  # [out]
    weight = body.op("Gather", [weights, tap], "weight", axis=1)
    weight = body.op("Unsqueeze", [weight, body.const("k", [1], np.int64)])  # [out, 1]
    pixels = body.op("Gather", [image, line], "pixels", axis=2)
    acc_next = body.op("Add", [acc, body.op("Mul", [pixels, weight])], "acc_next")
    cond_next = body.op("Identity", [cond], "cond_next")
    loop_body = body.graph(
        [
            _value(tap, TensorProto.INT64, []),
            _value(cond, TensorProto.BOOL, []),
            _value(acc, TensorProto.INT32, IMAGE_DIMS),
        ],
        [_value(cond_next, TensorProto.BOOL, []), _value(acc_next, TensorProto.INT32, IMAGE_DIMS)],
    )
    total = b.op("Loop", [taps, "", acc0], "sum", body=loop_body)
    # Non-negative before dividing, so integer Div is floor division (Pillow's >> 22).
    total = b.op("Max", [total, b.const("k", 0, np.int32)])
    levels = b.op("Div", [total, b.const("k", 1 << PRECISION_BITS, np.int32)])
    return b.op("Min", [levels, b.const("k", 255, np.int32)], "resampled")


def _exact_resample(b: _Builder, image: str, axis: int, size: str, coefficients: tuple) -> str:
    """An exact Pillow pass of an int32 NCHW image along `axis`; the horizontal one runs on
    the transposed image, so that each tap gathers whole contiguous lines."""
    if axis == 2:
        return _accumulate_taps(b, image, size, coefficients)
    columns = b.op("Transpose", [image], "columns", perm=SWAP_LAST_AXES)
    resampled = _accumulate_taps(b, columns, size, coefficients)
    return b.op("Transpose", [resampled], "rows", perm=SWAP_LAST_AXES)


# ------------------------------------------------------- fast: ONNX Resize, rounded per pass


def _resize_resample(b: _Builder, image: str, axis: int, size: str) -> str:
    """ONNX Resize of a float NCHW image along `axis`, rounded half up (floor(x + 0.5): Pillow
    rounds ties up, Round would round them to even) and clipped to 0..255."""
    before, after = (
        b.op("Shape", [image], start=0, end=axis),
        b.op("Shape", [image], start=axis + 1),
    )
    sizes = b.op("Concat", [before, size, after], "sizes", axis=0)
    resized = b.op(
        "Resize",
        [image, "", "", sizes],
        "resized",
        mode="cubic",
        cubic_coeff_a=-0.5,
        exclude_outside=1,
        antialias=1,
        coordinate_transformation_mode="half_pixel",
    )
    rounded = b.op("Floor", [b.op("Add", [resized, b.const("half", 0.5, np.float32)])])
    levels = b.const("zero", 0.0, np.float32), b.const("max_level", 255.0, np.float32)
    return b.op("Clip", [rounded, *levels], "clipped")


# ------------------------------------------------------------------------- the whole graph


def _pass(b: _Builder, image: str, axis: int, sides: tuple[str, str, Any], exact: bool) -> str:
    """One resampling pass along `axis` (2: vertical, 3: horizontal) of an NCHW image, skipped
    (as Pillow skips it) when that side keeps its size. `sides`: (side, new side, coefficients)."""
    side, new_side, coefficients = sides
    dtype = TensorProto.INT32 if exact else TensorProto.FLOAT
    keep = _Builder(f"{b.prefix}keep{b.count}/")
    kept = keep.op("Identity", [image], "kept")
    resample = _Builder(f"{b.prefix}pass{b.count}/")
    if exact:
        out = _exact_resample(resample, image, axis, new_side, coefficients)
    else:
        out = _resize_resample(resample, image, axis, new_side)
    return b.op(
        "If",
        [b.op("Squeeze", [b.op("Equal", [side, new_side])], "keeps_size")],
        "pass",
        then_branch=keep.graph([], [_value(kept, dtype, IMAGE_DIMS)]),
        else_branch=resample.graph([], [_value(out, dtype, IMAGE_DIMS)]),
    )


def _two_passes(
    prefix: str, image: str, passes: list[tuple[int, Any]], exact: bool
) -> onnx.GraphProto:
    """An `If` branch: the two (axis, sides) passes, in this order, of the uint8 NCHW `image`."""
    b = _Builder(prefix)
    dtype = TensorProto.INT32 if exact else TensorProto.FLOAT
    out = b.op("Cast", [image], to=dtype)
    for axis, sides in passes:
        out = _pass(b, out, axis, sides, exact)
    return b.graph([], [_value(out, dtype, IMAGE_DIMS)])


def _resize(b: _Builder, sides: tuple[str, str], new_sides: tuple[str, str], exact: bool) -> str:
    """Pillow's two-pass bicubic resize of `IMAGE` to [N, 3, newH, newW], in Pillow's order."""
    image = b.op("Transpose", [INPUT_NAME], "image_nchw", perm=[0, 3, 1, 2])
    passes = []
    for axis, side, new_side in zip((2, 3), sides, new_sides, strict=True):
        coefficients = _pillow_coefficients(b, side, new_side) if exact else None
        passes.append((axis, (side, new_side, coefficients)))
    return b.op(
        "If",
        [_vertical_first(b, *sides, *new_sides)],
        "resized",
        then_branch=_two_passes("vertical_first/", image, passes, exact),
        else_branch=_two_passes("horizontal_first/", image, passes[::-1], exact),
    )


def _center_crop(
    b: _Builder, image: str, sides: tuple[str, str], crop_height: int, crop_width: int
) -> str:
    """transformers' `center_crop` of an NCHW image: crop at (size - crop) // 2 and zero-pad
    where the image is smaller than the crop (ceil(deficit / 2) before, the rest after)."""
    size = b.op("Concat", list(sides), "resized_size", axis=0)
    crop = b.const("crop", [crop_height, crop_width], np.int64)
    zero, one, two = (b.const(f"c{v}", [v], np.int64) for v in (0, 1, 2))
    # The Div operands are never negative here, so integer Div is floor division.
    start = b.op("Div", [b.op("Max", [b.op("Sub", [size, crop]), zero]), two], "crop_start")
    deficit = b.op("Max", [b.op("Sub", [crop, size]), zero], "deficit")
    pad_before = b.op("Div", [b.op("Add", [deficit, one]), two], "pad_before")
    pad_after = b.op("Sub", [deficit, pad_before], "pad_after")
    axes = b.const("hw_axes", [2, 3], np.int64)
    cropped = b.op("Slice", [image, start, b.op("Add", [start, crop]), axes], "cropped")
    pads = b.op("Concat", [pad_before, pad_after], "pads", axis=0)
    padded = b.op("Pad", [cropped, pads, "", axes], "padded")  # constant mode, zeros
    fixed_shape = b.const("fixed_shape", [-1, 3, crop_height, crop_width], np.int64)
    return b.op("Reshape", [padded, fixed_shape], "crop")


def pixel_table(config: PreprocessConfig) -> np.ndarray:
    """float32 [3, 256]: what transformers makes of grey level v in channel c, computed as it
    does: `rescale` (float64 multiply, cast to float32), then `normalize` ((x - mean) / std
    with float32 mean and std)."""
    levels = np.arange(256, dtype=np.uint8)[None, :].repeat(3, axis=0)
    if config.rescale_factor is None:
        values = levels.astype(np.float32)
    else:
        values = (levels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.image_mean is not None and config.image_std is not None:
        mean = np.array(config.image_mean, dtype=np.float32)[:, None]
        std = np.array(config.image_std, dtype=np.float32)[:, None]
        values = (values - mean) / std
    return values


def _rescale_normalize(b: _Builder, image: str, config: PreprocessConfig) -> str:
    """Rescale and normalise an NCHW image of grey levels 0..255: one lookup in `pixel_table`
    (bit-identical to transformers, and one op instead of five)."""
    levels = b.op("Cast", [image], "levels", to=TensorProto.INT32)
    offsets = b.const("channel_offset", np.arange(3).reshape(3, 1, 1) * 256, np.int32)
    table = b.const("pixel_table", pixel_table(config).reshape(-1), np.float32)
    return b.op("Gather", [table, b.op("Add", [levels, offsets])], "normalized", axis=0)


def build_preprocess_model(
    processor: CLIPImageProcessorPil | Mapping[str, Any], *, exact: bool = True
) -> onnx.ModelProto:
    """The ONNX graph of `processor` (a `CLIPImageProcessorPil` or its config dict).

    Input `IMAGE`: uint8 [batch, height, width, 3] RGB; output `PIXEL_VALUES`: float32
    [batch, 3, crop_height, crop_width]. `exact=True` reproduces Pillow's integer resampling
    bit for bit; `exact=False` uses ONNX Resize, faster but not exact (see the module doc).
    Raises ValueError for processor settings the graph does not reproduce.
    """
    config = read_config(processor)
    b = _Builder("preprocess/")
    sides = (
        b.op("Shape", [INPUT_NAME], "height", start=1, end=2),
        b.op("Shape", [INPUT_NAME], "width", start=2, end=3),
    )
    new_sides = _resized_size(b, *sides, config.shortest_edge)
    resized = _resize(b, sides, new_sides, exact)
    cropped = _center_crop(b, resized, new_sides, config.crop_height, config.crop_width)
    pixels = _rescale_normalize(b, cropped, config)
    b.nodes.append(helper.make_node("Identity", [pixels], [OUTPUT_NAME]))

    graph = helper.make_graph(
        b.nodes,
        "clip_preprocess",
        [_value(INPUT_NAME, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [
            _value(
                OUTPUT_NAME, TensorProto.FLOAT, ["batch", 3, config.crop_height, config.crop_width]
            )
        ],
        b.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="export.onnx_preprocess",
        doc_string=f"CLIPImageProcessorPil preprocessing ({'exact' if exact else 'ONNX Resize'})",
    )
    onnx.checker.check_model(model, full_check=True)
    return model
