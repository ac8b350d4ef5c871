"""Tests for TextNorm and ensembles: numpy reference (service) and torch mirror (export)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.textnorm import (
    ensemble_mean,
    ensemble_uncertainty,
    textnorm,
    textnorm_probabilities,
)

try:
    import torch

    from export.textnorm_torch import (
        ensemble_mean_torch,
        ensemble_uncertainty_torch,
        textnorm_probabilities_torch,
        textnorm_torch,
    )
except ImportError:  # pragma: no cover - the torch tests are skipped below
    torch = None

E = math.e


# --------------------------------------------------------------------------- hand-computed cases


def test_hand_case_scale_1() -> None:
    # r = [0.3, 0.1, 0.2]: min 0.1, max 0.3, span 0.2 -> r̂ = [1, 0, 0.5]
    # p0 = e^1 / (e^1 + e^0 + e^0.5)
    expected = E / (E + 1.0 + math.exp(0.5))
    assert textnorm(np.array([0.3, 0.1, 0.2])) == pytest.approx(expected, abs=1e-12)


def test_hand_case_scale_3_full_distribution() -> None:
    # c = 3: r̂ = 3 · [1, 0, 0.5] = [3, 0, 1.5]; Z = e^3 + e^0 + e^1.5
    z = math.exp(3) + 1.0 + math.exp(1.5)
    expected = np.array([math.exp(3) / z, 1.0 / z, math.exp(1.5) / z])
    got = textnorm_probabilities(np.array([0.3, 0.1, 0.2]), scale=3.0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert textnorm(np.array([0.3, 0.1, 0.2]), scale=3.0) == pytest.approx(expected[0], abs=1e-12)


def test_hand_case_true_prompt_not_best() -> None:
    # r = [2, 6, 4, 10]: min 2, span 8 -> r̂ = [0, 0.5, 0.25, 1]
    # p0 = 1 / (1 + e^0.5 + e^0.25 + e^1)
    expected = 1.0 / (1.0 + math.exp(0.5) + math.exp(0.25) + E)
    assert textnorm(np.array([2.0, 6.0, 4.0, 10.0])) == pytest.approx(expected, abs=1e-12)


def test_ties_two_prompts_share_max() -> None:
    # r = [0.5, 0.5, 0.2] -> r̂ = [1, 1, 0] -> p0 = e / (2e + 1)
    assert textnorm(np.array([0.5, 0.5, 0.2])) == pytest.approx(E / (2 * E + 1), abs=1e-12)
    # contrastive prompts tie at the max, true prompt at the min:
    # r = [0.2, 0.5, 0.5] -> r̂ = [0, 1, 1] -> p0 = 1 / (1 + 2e)
    assert textnorm(np.array([0.2, 0.5, 0.5])) == pytest.approx(1 / (1 + 2 * E), abs=1e-12)
    # the two tied entries receive identical probability
    p = textnorm_probabilities(np.array([0.2, 0.5, 0.5]))
    assert p[1] == p[2]


def test_all_equal_gives_uniform() -> None:
    # max r == min r: result is 1/|P| regardless of scale
    for n in (2, 3, 4, 7):
        for c in (0.1, 1.0, 10.0):
            r = np.full(n, 0.37)
            assert textnorm(r, scale=c) == pytest.approx(1.0 / n, abs=1e-15)
            np.testing.assert_allclose(textnorm_probabilities(r, scale=c), np.full(n, 1.0 / n))


def test_single_prompt_gives_one() -> None:
    # |P| = 1: degenerate, 1/1
    assert textnorm(np.array([0.42])) == 1.0
    out = textnorm(np.array([[0.1], [-3.0], [5.0]]))
    assert out.shape == (3,)
    np.testing.assert_array_equal(out, [1.0, 1.0, 1.0])


def test_degenerate_with_mask_counts_only_valid() -> None:
    # valid entries [0.4, 0.4] (padding is NaN and ignored) -> 1/2
    r = np.array([0.4, 0.4, np.nan, 99.0])
    m = np.array([True, True, False, False])
    assert textnorm(r, mask=m) == pytest.approx(0.5, abs=1e-15)
    # only the true prompt valid -> 1.0
    m1 = np.array([True, False, False, False])
    assert textnorm(r, mask=m1) == 1.0


def test_large_magnitude_rewards_do_not_overflow() -> None:
    # span would be 2e308 = inf without care; min-max still gives r̂ = [1, 0, 0.5]
    r = np.array([1e308, -1e308, 0.0])
    assert textnorm(r) == pytest.approx(E / (E + 1.0 + math.exp(0.5)), abs=1e-12)
    # and with c > 1: c · (r - r_min) overflowed before the division (NaN)
    assert textnorm(r[:2], 5.0) == pytest.approx(math.exp(5) / (math.exp(5) + 1), abs=1e-12)


# ------------------------------------------------------------------------------------ properties


def test_output_shape_dtype_and_normalisation() -> None:
    rng = np.random.default_rng(0)
    r = rng.normal(size=(2, 3, 5)).astype(np.float32)
    out = textnorm(r, scale=2.0)
    assert out.shape == (2, 3)
    assert out.dtype == np.float64
    p = textnorm_probabilities(r, scale=2.0)
    assert p.shape == (2, 3, 5)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-12)
    assert np.all((out > 0) & (out <= 1))


def test_vectorised_matches_row_by_row() -> None:
    rng = np.random.default_rng(1)
    r = rng.normal(size=(4, 6))
    scales = np.array([0.1, 1.0, 3.0, 10.0])
    batched = textnorm(r, scale=scales)
    for i in range(4):
        assert batched[i] == pytest.approx(textnorm(r[i], scale=float(scales[i])), abs=1e-15)


def test_masking_equals_dropping_padded_entries() -> None:
    rng = np.random.default_rng(2)
    for _ in range(50):
        p = int(rng.integers(1, 9))
        r = rng.normal(size=p)
        m = rng.random(p) < 0.6
        m[0] = True
        padded = np.where(m, r, rng.normal(size=p) * 100)  # garbage in padding
        c = float(rng.uniform(0.1, 10))
        assert textnorm(padded, scale=c, mask=m) == pytest.approx(
            textnorm(r[m], scale=c), abs=1e-14
        )
        probs = textnorm_probabilities(padded, scale=c, mask=m)
        assert np.all(probs[~m] == 0.0)
        np.testing.assert_allclose(probs[m], textnorm_probabilities(r[m], scale=c), atol=1e-14)


def test_invariance_to_affine_transform() -> None:
    rng = np.random.default_rng(3)
    r = rng.normal(size=(20, 7))
    base = textnorm(r, scale=3.0)
    for a, b in [(2.0, 0.0), (0.01, 5.0), (100.0, -42.0), (1.0, 1e3)]:
        np.testing.assert_allclose(textnorm(a * r + b, scale=3.0), base, atol=1e-9)
    # a negative a reverses the ranking and so is NOT an invariance
    assert not np.allclose(textnorm(-r, scale=3.0), base)


def test_larger_scale_sharpens_top_scored_true_prompt() -> None:
    # the true prompt has the unique max -> p0 strictly increases with c and tends to 1
    r = np.array([0.9, 0.1, 0.5, 0.3])
    scales = [0.1, 1.0, 3.0, 5.0, 10.0, 50.0]
    p0 = [float(textnorm(r, scale=c)) for c in scales]
    assert all(a < b for a, b in zip(p0, p0[1:], strict=False))
    assert p0[0] > 1 / 4  # even a small c puts more than uniform mass on the top prompt
    assert p0[-1] > 0.99
    # and for a bottom-scored true prompt it strictly decreases towards 0
    q0 = [float(textnorm(np.array([0.1, 0.9, 0.5, 0.3]), scale=c)) for c in scales]
    assert all(a > b for a, b in zip(q0, q0[1:], strict=False))
    assert q0[-1] < 1e-10


def test_integer_rewards_accepted() -> None:
    # r = [3, 1, 2] is 10 · [0.3, 0.1, 0.2] -> same r̂ = [1, 0, 0.5]
    assert textnorm(np.array([3, 1, 2])) == pytest.approx(E / (E + 1 + math.exp(0.5)))


# ------------------------------------------------------------------------------------ ensembles


def test_ensemble_hand_case() -> None:
    # M = 3 models, 2 samples: column 0 = [0.2, 0.4, 0.6], column 1 = [0.5, 0.5, 0.5]
    probs = np.array([[0.2, 0.5], [0.4, 0.5], [0.6, 0.5]])
    # mean: [0.4, 0.5]
    np.testing.assert_allclose(ensemble_mean(probs), [0.4, 0.5], atol=1e-15)
    # population variance col 0: ((-0.2)^2 + 0^2 + 0.2^2) / 3 = 0.08 / 3; col 1: 0
    # λ = 1: R = [0.4 - 0.08/3, 0.5]
    np.testing.assert_allclose(ensemble_uncertainty(probs), [0.4 - 0.08 / 3, 0.5], atol=1e-15)
    # λ = 2.5: R = [0.4 - 2.5 · 0.08/3, 0.5]
    np.testing.assert_allclose(
        ensemble_uncertainty(probs, lam=2.5), [0.4 - 0.2 / 3, 0.5], atol=1e-15
    )
    # λ = 0 is the plain mean
    np.testing.assert_allclose(ensemble_uncertainty(probs, lam=0.0), ensemble_mean(probs))


def test_ensemble_single_model_has_no_penalty() -> None:
    # M = 1: variance 0 -> R = p̄ = p_1
    probs = np.array([[0.1, 0.7, 0.3]])
    np.testing.assert_allclose(ensemble_mean(probs), [0.1, 0.7, 0.3])
    np.testing.assert_allclose(ensemble_uncertainty(probs, lam=5.0), [0.1, 0.7, 0.3])


def test_ensemble_uses_population_variance() -> None:
    rng = np.random.default_rng(4)
    probs = rng.random(size=(5, 3, 4))
    expected = probs.mean(axis=0) - 1.5 * probs.var(axis=0, ddof=0)
    out = ensemble_uncertainty(probs, lam=1.5)
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out, expected, atol=1e-15)


# ------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rewards": np.array([0.1, 0.2]), "scale": 0.0}, "scale"),
        ({"rewards": np.array([0.1, 0.2]), "scale": -1.0}, "scale"),
        ({"rewards": np.array([0.1, 0.2]), "scale": float("inf")}, "scale"),
        ({"rewards": np.array([0.1, 0.2]), "scale": float("nan")}, "scale"),
        ({"rewards": np.zeros((2, 3)), "scale": np.array([1.0, 2.0, 3.0])}, "broadcast"),
        ({"rewards": np.zeros((3, 0))}, "P >= 1"),
        ({"rewards": np.array(0.5)}, "at least one axis"),
        ({"rewards": np.array([0.1, np.nan])}, "NaN or infinite"),
        ({"rewards": np.array([0.1, np.inf])}, "NaN or infinite"),
        ({"rewards": np.array([-np.inf, 0.1])}, "NaN or infinite"),
        ({"rewards": np.array(["a", "b"])}, "numeric"),
        ({"rewards": np.zeros(3), "mask": np.array([True, True])}, "mask shape"),
        ({"rewards": np.zeros(3), "mask": np.array([1, 1, 0])}, "boolean"),
        ({"rewards": np.zeros(3), "mask": np.array([False, True, True])}, r"mask\[\.\.\., 0\]"),
        (
            {"rewards": np.zeros((2, 2)), "mask": np.array([[True, True], [False, True]])},
            r"mask\[\.\.\., 0\]",
        ),
    ],
)
def test_textnorm_validation_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        textnorm(**kwargs)
    with pytest.raises(ValueError, match=match):
        textnorm_probabilities(**kwargs)


def test_ensemble_validation_errors() -> None:
    with pytest.raises(ValueError, match="M >= 1"):
        ensemble_mean(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="M >= 1"):
        ensemble_uncertainty(np.zeros((0,)))
    with pytest.raises(ValueError, match=r"\[M, \.\.\.\]"):
        ensemble_mean(np.array(0.5))
    with pytest.raises(ValueError, match="NaN or infinite"):
        ensemble_uncertainty(np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="lam"):
        ensemble_uncertainty(np.array([0.5, 0.6]), lam=-1.0)
    with pytest.raises(ValueError, match="lam"):
        ensemble_uncertainty(np.array([0.5, 0.6]), lam=float("nan"))


# ------------------------------------------------------------------------- torch (export) mirror

# The numpy tests above run without torch (the service core is torch-free); these need it.
requires_torch = pytest.mark.skipif(torch is None, reason="torch (export extra) not installed")


def _random_case(
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random [B, P] rewards, mask and per-row scale, including degenerate rows."""
    b = int(rng.integers(1, 9))
    p = int(rng.integers(1, 12))
    r = rng.normal(size=(b, p)) * rng.choice([0.01, 1.0, 100.0])
    m = rng.random((b, p)) < rng.uniform(0.3, 1.0)
    m[:, 0] = True
    for i in range(b):
        kind = rng.integers(0, 5)
        if kind == 0:  # all valid entries equal -> degenerate
            r[i] = r[i, 0]
        elif kind == 1:  # only the true prompt valid
            m[i, 1:] = False
        elif kind == 2 and p > 1:  # tie at the max with the true prompt
            r[i, 1] = r[i, 0] = np.abs(r[i]).max() + 1.0
    r = np.where(m, r, rng.choice([np.nan, np.inf, 1e6]))  # padding may hold garbage
    c = rng.choice([0.1, 1.0, 3.0, 5.0, 10.0], size=b) * rng.uniform(0.5, 2.0, size=b)
    return r, m, c


@requires_torch
def test_torch_matches_numpy_randomized() -> None:
    rng = np.random.default_rng(123)
    n_degenerate = 0
    for _ in range(300):
        r, m, c = _random_case(rng)
        expected_p = textnorm_probabilities(r, scale=c, mask=m)
        expected = textnorm(r, scale=c, mask=m)
        valid_r = np.where(m, r, r[:, :1])
        n_degenerate += int(np.sum(valid_r.max(axis=1) == valid_r.min(axis=1)))

        rt = torch.from_numpy(r)
        mt = torch.from_numpy(m)
        ct = torch.from_numpy(c)
        got_p = textnorm_probabilities_torch(rt, ct, mt)
        got = textnorm_torch(rt, ct, mt)
        assert got.dtype == torch.float64
        assert got.shape == (r.shape[0],)
        np.testing.assert_allclose(got_p.numpy(), expected_p, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
        assert torch.isfinite(got_p).all()

        # scalar scale: python float and 0-d tensor agree with numpy
        c0 = float(c[0])
        exp0 = textnorm(r, scale=c0, mask=m)
        np.testing.assert_allclose(textnorm_torch(rt, c0, mt).numpy(), exp0, atol=1e-6)
        np.testing.assert_allclose(
            textnorm_torch(rt, torch.tensor(c0, dtype=torch.float64), mt).numpy(), exp0, atol=1e-6
        )
    assert n_degenerate > 50  # the random cases really exercised the degenerate branch


@requires_torch
def test_torch_matches_numpy_without_mask_and_extra_leading_axes() -> None:
    rng = np.random.default_rng(7)
    r = rng.normal(size=(3, 4, 6))
    r[0, 0] = 0.25  # one degenerate row
    np.testing.assert_allclose(
        textnorm_torch(torch.from_numpy(r), 3.0).numpy(), textnorm(r, scale=3.0), atol=1e-6
    )


@requires_torch
def test_torch_hand_case_and_float32() -> None:
    # same hand case as above: r̂ = [1, 0, 0.5] -> e / (e + 1 + e^0.5); degenerate row -> 1/3
    r = torch.tensor([[0.3, 0.1, 0.2], [0.7, 0.7, 0.7]], dtype=torch.float32)
    out = textnorm_torch(r, torch.tensor([1.0, 1.0]))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), [E / (E + 1 + math.exp(0.5)), 1 / 3], atol=1e-6)


@requires_torch
def test_torch_does_not_modify_inputs_and_has_finite_gradients() -> None:
    rng = np.random.default_rng(8)
    r, m, c = _random_case(rng)
    r = np.where(m, r, 0.0)  # finite padding so input equality is checkable
    r[0, m[0]] = 1.5  # force a degenerate row
    rt = torch.tensor(r, requires_grad=True)
    mt = torch.from_numpy(m.copy())
    ct = torch.from_numpy(c.copy())
    before = (rt.detach().clone(), mt.clone(), ct.clone())
    out = textnorm_torch(rt, ct, mt)
    out.sum().backward()
    assert torch.equal(rt.detach(), before[0])
    assert torch.equal(mt, before[1])
    assert torch.equal(ct, before[2])
    assert rt.grad is not None and torch.isfinite(rt.grad).all()
    # padded entries do not influence the result
    assert torch.all(rt.grad[~mt] == 0)


@requires_torch
def test_torch_mask_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="mask shape"):
        textnorm_torch(torch.zeros(2, 3), 1.0, torch.ones(2, 4, dtype=torch.bool))


@requires_torch
def test_torch_graph_is_value_independent() -> None:
    # torch.export fails on data-dependent Python control flow; the exported program must
    # reproduce eager results on new data, including degenerate rows and other batch sizes.
    class TextNormModule(torch.nn.Module):
        def forward(self, rewards, scale, mask):  # type: ignore[no-untyped-def]
            return textnorm_torch(rewards, scale, mask)

    batch = torch.export.Dim("batch", min=2, max=64)
    example = (
        torch.randn(4, 5, dtype=torch.float64),
        torch.ones(4, dtype=torch.float64),
        torch.ones(4, 5, dtype=torch.bool),
    )
    exported = torch.export.export(
        TextNormModule(),
        example,
        dynamic_shapes={"rewards": {0: batch}, "scale": {0: batch}, "mask": {0: batch}},
    )
    rng = np.random.default_rng(9)
    r = rng.normal(size=(7, 5))
    r[1] = 0.3  # degenerate
    m = rng.random((7, 5)) < 0.5
    m[:, 0] = True
    c = rng.uniform(0.1, 10, size=7)
    got = exported.module()(torch.from_numpy(r), torch.from_numpy(c), torch.from_numpy(m))
    np.testing.assert_allclose(got.numpy(), textnorm(r, scale=c, mask=m), atol=1e-6)


@requires_torch
def test_torch_ensembles_match_numpy() -> None:
    rng = np.random.default_rng(10)
    for _ in range(50):
        shape = tuple(int(s) for s in rng.integers(1, 6, size=int(rng.integers(1, 4))))
        probs = rng.random(size=shape)
        lam = float(rng.uniform(0, 3))
        pt = torch.from_numpy(probs)
        np.testing.assert_allclose(ensemble_mean_torch(pt).numpy(), ensemble_mean(probs), atol=1e-6)
        np.testing.assert_allclose(
            ensemble_uncertainty_torch(pt, lam).numpy(),
            ensemble_uncertainty(probs, lam=lam),
            atol=1e-6,
        )
    # hand case from test_ensemble_hand_case
    pt = torch.tensor([[0.2, 0.5], [0.4, 0.5], [0.6, 0.5]], dtype=torch.float64)
    np.testing.assert_allclose(
        ensemble_uncertainty_torch(pt, torch.tensor(1.0)).numpy(), [0.4 - 0.08 / 3, 0.5]
    )
    with pytest.raises(ValueError, match="M >= 1"):
        ensemble_mean_torch(torch.zeros(0, 3))
