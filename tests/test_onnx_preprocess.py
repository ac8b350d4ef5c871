"""The in-graph CLIP preprocessing (export/onnx_preprocess.py) against `CLIPImageProcessorPil`,
and the RGB conversion before it (gateway and clients) against transformers' `convert_to_rgb`.

Every comparison runs the ONNX model in onnxruntime's CPU provider and the HF processor on the
same uint8 images. The tolerance is one grey level after normalisation, 1 / 255 / min(std);
the default (exact) graph is also checked to be bit-identical.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from transformers import CLIPImageProcessorPil

from export.onnx_preprocess import INPUT_NAME, OUTPUT_NAME, build_preprocess_model, read_config

# (name, height, width): shapes that exercise both pass orders, up- and downscaling, odd sizes.
SHAPES = [
    ("square", 96, 96),
    ("tall", 300, 80),  # vertical pass first (H - newH > 2 (W - newW))
    ("wide", 80, 300),
    ("tiny", 20, 30),  # upscaled
    ("tiny_square", 7, 7),
    ("odd_tall", 131, 97),
    ("odd_wide", 97, 131),
    ("order_tie", 160, 80),  # S=64: H - newH == 2 (W - newW) exactly: horizontal first
    ("order_tie_plus_one", 161, 80),  # one row more: vertical first
    ("very_tall", 1000, 90),
]


def make_processor(
    shortest_edge: int, crop: int | tuple[int, int], **kwargs
) -> CLIPImageProcessorPil:
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    return CLIPImageProcessorPil(
        size={"shortest_edge": shortest_edge},
        crop_size={"height": crop_h, "width": crop_w},
        **kwargs,
    )


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def noise(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def smooth(n: int, h: int, w: int) -> np.ndarray:
    """Gradients: red down, green across, blue along the diagonal (one per batch item, shifted)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    images = []
    for i in range(n):
        red = yy * 255 / max(h - 1, 1)
        green = (xx * 255 / max(w - 1, 1) + 37 * i) % 256
        blue = (yy + xx) * 255 / max(h + w - 2, 1)
        images.append(np.stack([red, green, blue], axis=-1).round().astype(np.uint8))
    return np.stack(images)


def reference(processor: CLIPImageProcessorPil, images: np.ndarray) -> np.ndarray:
    # channels_last spelled out: the processor guesses wrong on images 3 or fewer pixels high.
    return processor(images=list(images), return_tensors="np", input_data_format="channels_last")[
        "pixel_values"
    ]


def grey_levels(processor: CLIPImageProcessorPil, out: np.ndarray, ref: np.ndarray) -> float:
    """The largest difference in grey levels (undoing normalisation per channel)."""
    std = np.asarray(processor.image_std, dtype=np.float64)[None, :, None, None]
    return float((np.abs(out.astype(np.float64) - ref) * std * 255).max())


def assert_matches(processor: CLIPImageProcessorPil, sess: ort.InferenceSession, images):
    ref = reference(processor, images)
    (out,) = sess.run(None, {INPUT_NAME: images})
    crop = processor.crop_size
    assert out.shape == (len(images), 3, crop.height, crop.width) == ref.shape
    assert out.dtype == np.float32
    tolerance = 1 / 255 / min(processor.image_std) + 1e-6
    assert np.abs(out - ref).max() <= tolerance, f"{grey_levels(processor, out, ref)} grey levels"
    return out, ref


@pytest.fixture(scope="module")
def models() -> dict:
    """(processor, session) per (shortest_edge, crop, exact), built once."""
    cache: dict = {}

    def get(shortest_edge: int, crop: int | tuple[int, int], exact: bool = True):
        key = (shortest_edge, crop, exact)
        if key not in cache:
            processor = make_processor(shortest_edge, crop)
            cache[key] = processor, session(build_preprocess_model(processor, exact=exact))
        return cache[key]

    return get


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize(("name", "height", "width"), SHAPES)
def test_matches_hf_processor(models, size: int, name: str, height: int, width: int) -> None:
    processor, sess = models(size, size)
    rng = np.random.default_rng(height * 1000 + width)
    for images in (noise(rng, 1, height, width), smooth(1, height, width)):
        out, ref = assert_matches(processor, sess, images)
        np.testing.assert_array_equal(out, ref)  # the exact graph is bit-identical


@pytest.mark.parametrize("size", [64, 224])
def test_size_already_right(models, size: int) -> None:
    """No resize needed (Pillow skips both passes): the crop of the input itself."""
    processor, sess = models(size, size)
    images = noise(np.random.default_rng(1), 2, size, size + 9)
    out, ref = assert_matches(processor, sess, images)
    np.testing.assert_array_equal(out, ref)


def test_large_image(models) -> None:
    processor, sess = models(224, 224)
    out, ref = assert_matches(processor, sess, noise(np.random.default_rng(2), 1, 2048, 1536))
    np.testing.assert_array_equal(out, ref)


def test_batch_of_same_size_images(models) -> None:
    processor, sess = models(64, 64)
    rng = np.random.default_rng(3)
    images = np.concatenate([noise(rng, 3, 300, 80), smooth(2, 300, 80)])
    out, ref = assert_matches(processor, sess, images)
    np.testing.assert_array_equal(out, ref)
    # Batch items are independent: one at a time gives the same rows.
    (single,) = sess.run(None, {INPUT_NAME: images[3:4]})
    np.testing.assert_array_equal(single[0], out[3])


@pytest.mark.parametrize(
    ("size", "crop"),
    [(64, 80), (64, (48, 72)), (80, 64), (30, 64)],
    ids=["crop_larger_pads", "rect_crop", "crop_smaller", "pads_both_sides"],
)
@pytest.mark.parametrize(("height", "width"), [(300, 80), (80, 300), (20, 30), (64, 64)])
def test_crop_and_pad(models, size: int, crop, height: int, width: int) -> None:
    """Crop offsets as transformers computes them; zero padding (-mean/std) when crop > size."""
    processor, sess = models(size, crop)
    images = noise(np.random.default_rng(height + width), 1, height, width)
    out, ref = assert_matches(processor, sess, images)
    np.testing.assert_array_equal(out, ref)


def test_fast_resize_graph_within_a_grey_level_almost_everywhere(models) -> None:
    """`exact=False` (ONNX Resize, float32 weights): rare values round the other way."""
    processor, sess = models(224, 224, exact=False)
    rng = np.random.default_rng(4)
    for _, height, width in SHAPES:
        for images in (noise(rng, 1, height, width), smooth(1, height, width)):
            (out,) = sess.run(None, {INPUT_NAME: images})
            ref = reference(processor, images)
            assert out.shape == ref.shape
            levels = np.abs(out - ref) * np.asarray(processor.image_std)[None, :, None, None] * 255
            assert levels.max() <= 2 + 1e-3
            assert (levels > 0.5).mean() < 5e-3


def test_dict_config_and_other_settings() -> None:
    rng = np.random.default_rng(5)
    images = noise(rng, 2, 90, 70)
    processor = make_processor(64, 64)
    # The processor's own dict, and a minimal dict relying on CLIP's defaults, give one graph.
    from_dict = session(build_preprocess_model(processor.to_dict()))
    minimal = session(build_preprocess_model({"size": 64, "crop_size": 64}))
    for sess in (from_dict, minimal):
        assert_matches(processor, sess, images)
    # Without normalisation, and without rescaling either.
    for kwargs in ({"do_normalize": False}, {"do_normalize": False, "do_rescale": False}):
        plain = make_processor(64, 64, **kwargs)
        (out,) = session(build_preprocess_model(plain)).run(None, {INPUT_NAME: images})
        np.testing.assert_array_equal(out, reference(plain, images))


def test_graph_interface() -> None:
    model = build_preprocess_model(make_processor(224, 224))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    (image,) = model.graph.input
    (pixels,) = model.graph.output
    assert (image.name, pixels.name) == (INPUT_NAME, OUTPUT_NAME)
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert pixels.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    image_dims = image.type.tensor_type.shape.dim
    assert [d.dim_param for d in image_dims[:3]] == ["batch", "height", "width"]
    assert not any(d.HasField("dim_value") for d in image_dims[:3])
    assert image_dims[3].dim_value == 3
    pixel_dims = pixels.type.tensor_type.shape.dim
    assert pixel_dims[0].dim_param == "batch"
    assert [d.dim_value for d in pixel_dims[1:]] == [3, 224, 224]


def test_merges_with_a_tower_graph() -> None:
    """IR version and opsets line up with a torch-exported (IR 10, opset 18) tower."""
    tower = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("ReduceMean", [OUTPUT_NAME], ["EMBEDS"], keepdims=0)],
            "tower",
            [
                onnx.helper.make_tensor_value_info(
                    OUTPUT_NAME, onnx.TensorProto.FLOAT, ["b", 3, 64, 64]
                )
            ],
            [onnx.helper.make_tensor_value_info("EMBEDS", onnx.TensorProto.FLOAT, [])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 18)],
        ir_version=10,
    )
    pre = build_preprocess_model(make_processor(64, 64))
    merged = onnx.compose.merge_models(pre, tower, io_map=[(OUTPUT_NAME, OUTPUT_NAME)])
    onnx.checker.check_model(merged, full_check=True)
    images = noise(np.random.default_rng(6), 1, 50, 40)
    (embeds,) = session(merged).run(None, {INPUT_NAME: images})
    np.testing.assert_allclose(embeds, reference(make_processor(64, 64), images).mean(), rtol=1e-5)


class _TorchvisionLike:
    backend = "torchvision"

    def __repr__(self) -> str:  # a stable test id: xdist's workers must collect the same ids
        return "torchvision-processor"


@pytest.mark.parametrize(
    "config",
    [
        {"resample": 2},
        {"size": {"height": 224, "width": 224}},
        {"size": {"shortest_edge": 224, "longest_edge": 300}},
        {"size": {"longest_edge": 224}},
        {"do_resize": False},
        {"do_center_crop": False},
        {"do_pad": True},
        {"crop_size": {"shortest_edge": 224}},
        {"image_mean": [0.5, 0.5]},
        {"size": "224"},
        _TorchvisionLike(),
    ],
    ids=repr,
)
def test_unsupported_configs_raise(config) -> None:
    with pytest.raises(ValueError, match="^unsupported [^\n]*$"):
        build_preprocess_model(config)


def test_unsupported_processor_object_raises() -> None:
    bilinear = CLIPImageProcessorPil(resample=2)
    with pytest.raises(ValueError, match="resample"):
        read_config(bilinear)
    square = CLIPImageProcessorPil(size={"height": 224, "width": 224})
    with pytest.raises(ValueError, match="shortest_edge"):
        build_preprocess_model(square)


def _transparent_images() -> dict:
    """Images whose pixels are (partly) transparent, with colours hidden under the alpha."""
    from PIL import Image

    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    rgba[:4, :, 3] = 0  # a fully transparent border over random colours
    palette = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0  # a transparent palette entry (tRNS)
    keyed = Image.fromarray(rgba[..., :3])
    keyed.info["transparency"] = tuple(int(v) for v in rgba[0, 0, :3])  # a transparent colour
    return {
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "LA": Image.fromarray(rgba[..., [0, 3]], "LA"),
        "P+tRNS": palette,
        "RGB+tRNS": keyed,
    }


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+tRNS", "RGB+tRNS"])
def test_transparency_becomes_rgb_as_clips_processor_makes_it(mode):
    # Transparent pixels are composited onto white, as transformers' `convert_to_rgb` (the
    # processor's first step) does. The gateway, the REST client and the gRPC client dropped
    # the alpha instead: the colours under it reached the model (a shipped-model reward of
    # -0.21 served against 0.57 from the processor, for an 8-px transparent border).
    import base64
    import io

    from textnorm_reward_client.grpc_client import _pixels
    from textnorm_reward_client.images import _decoded
    from transformers.image_transforms import convert_to_rgb

    from service.gateway.images import ImageLimits, decode_image

    image = _transparent_images()[mode]
    png = io.BytesIO()
    image.save(png, "PNG")
    expected = convert_to_rgb(image, return_numpy=True)
    limits = ImageLimits(
        max_bytes=1 << 20, max_pixels=1 << 20, max_aspect_ratio=4, max_request_pixels=1 << 20
    )
    served = decode_image(base64.b64encode(png.getvalue()).decode(), "image", limits)
    assert not np.array_equal(np.asarray(image.convert("RGB")), expected)  # alpha matters here
    for got in (served, _decoded(png.getvalue()), _pixels(png.getvalue()), _decoded(image)):
        np.testing.assert_array_equal(got, expected)
