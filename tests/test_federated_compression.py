"""Update codecs: int8 error bounds, unbiased stochastic rounding, bytes on the wire, and refusing bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest

from privlora.errors import UserError
from privlora.federated.compression import CODECS, Int8Codec, get_codec, wire_bytes


def _lora_update(n: int = 24, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((384, 8)) * rng.uniform(0.001, 0.1)).astype(np.float32) for _ in range(n)]


def test_int8_encoded_form_is_int8_tensors_then_scales():
    xs = _lora_update(3) + [np.float32([[0.5, -2.0, 1.0]])]
    enc = get_codec("int8").encode(xs)
    assert len(enc) == len(xs) + 1
    for q, x in zip(enc[:-1], xs, strict=True):
        assert q.dtype == np.int8 and q.shape == x.shape
        assert np.abs(q).max() == 127  # the largest element uses the full range
    assert enc[-1].dtype == np.float32 and enc[-1].shape == (len(xs),)
    np.testing.assert_allclose(enc[-1], [np.abs(x).max() / 127 for x in xs], rtol=1e-6)
    np.testing.assert_array_equal(enc[3], [[32, -127, 64]])  # 0.5 / (2/127) = 31.75 → 32


def test_int8_round_trip_error_is_at_most_half_a_step():
    xs = _lora_update()
    dec = get_codec("int8").decode(get_codec("int8").encode(xs))
    for x, d in zip(xs, dec, strict=True):
        scale = np.abs(x).max() / 127
        assert d.dtype == np.float32 and d.shape == x.shape
        assert np.abs(d - x).max() <= scale / 2 * (1 + 1e-5)
        # and it is the nearest grid point, computed independently
        np.testing.assert_allclose(d, np.round(x.astype(np.float64) / scale) * scale, rtol=1e-5, atol=scale * 1e-5)


def test_zero_tensors_decode_to_exact_zeros():
    xs = [np.zeros((4, 3), np.float32), np.float32([1.0, -1.0]), np.zeros((0, 8), np.float32)]
    codec = get_codec("int8")
    enc = codec.encode(xs)
    assert np.all(enc[-1] > 0)
    dec = codec.decode(enc)
    np.testing.assert_array_equal(dec[0], np.zeros((4, 3), np.float32))
    np.testing.assert_array_equal(dec[1], [1.0, -1.0])
    assert dec[2].shape == (0, 8)


def test_stochastic_rounding_is_unbiased_where_nearest_is_not():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 64).astype(np.float32)
    x[0] = 1.0  # fixes scale = 1/127
    x[1] = 0.3 / 127  # nearest rounding always gives 0 here
    scale = 1 / 127
    codec = Int8Codec(stochastic=True, rng=np.random.default_rng(1))
    draws = 4000
    decoded = np.stack([codec.decode(codec.encode([x]))[0] for _ in range(draws)])
    # each draw is one of the two neighbouring grid points
    assert np.all(np.abs(decoded - x) <= scale * (1 + 1e-5))
    # per-element sd ≤ scale/2, so the mean's sd ≤ scale/(2√4000) ≈ 0.008·scale
    assert np.abs(decoded.mean(axis=0) - x).max() < 0.05 * scale
    assert decoded[:, 1].mean() == pytest.approx(0.3 * scale, abs=0.05 * scale)
    assert get_codec("int8").decode(get_codec("int8").encode([x]))[0][1] == 0.0


def test_none_codec_is_exact():
    xs = _lora_update(2)
    codec = get_codec("none")
    dec = codec.decode(codec.encode(xs))
    for x, d in zip(xs, dec, strict=True):
        np.testing.assert_array_equal(x, d)
    with pytest.raises(UserError, match="malformed uncompressed update"):
        codec.decode([np.zeros(3, np.float64)])


def test_wire_bytes_matches_npy_format():
    a = np.zeros((384, 8), np.float32)
    assert wire_bytes([a]) == 128 + 384 * 8 * 4  # .npy v1: 128-byte header for a plain array
    buf = io.BytesIO()
    np.save(buf, a.astype(np.int8), allow_pickle=False)
    assert wire_bytes([a, a.astype(np.int8)]) == 128 + 384 * 8 * 4 + len(buf.getvalue())
    assert wire_bytes([]) == 0


def test_int8_ships_about_a_quarter_of_the_bytes():
    xs = _lora_update()
    fp32 = wire_bytes(get_codec("none").encode(xs))
    int8 = wire_bytes(get_codec("int8").encode(xs))
    assert fp32 == 24 * (128 + 384 * 8 * 4)
    assert int8 <= 0.27 * fp32


@pytest.mark.parametrize(("arrays", "match"), [
    ([], "empty"),
    ([np.zeros(3, np.int8), np.float32([1.0, 1.0])], r"scale per tensor \(1 here\), got float32 of shape \(2,\)"),
    ([np.zeros(3, np.int8), np.float64([1.0])], "got float64"),
    ([np.zeros(3, np.float32), np.float32([1.0])], "not int8"),
    ([np.zeros(3, np.int8), np.float32([np.nan])], "finite and positive"),
    ([np.zeros(3, np.int8), np.float32([np.inf])], "finite and positive"),
    ([np.zeros(3, np.int8), np.float32([0.0])], "finite and positive"),
    ([np.zeros(3, np.int8), np.float32([-1.0])], "finite and positive"),
])
def test_malformed_int8_updates_are_refused(arrays, match):
    with pytest.raises(UserError, match="malformed int8 update: .*" + match):
        get_codec("int8").decode(arrays)


def test_encode_refuses_non_finite_updates_and_unknown_codecs_list_the_known_ones():
    with pytest.raises(UserError, match="NaN or infinite"):
        get_codec("int8").encode([np.float32([1.0, np.nan])])
    with pytest.raises(UserError, match="int8, none"):
        get_codec("fp4")
    assert set(CODECS) == {"none", "int8"}
