"""subsampling_stem_backward (the subsampling stem's fused parameter backward) and its use in training.

The op is compared with its reference (autograd through the composition, float64) under an error
bound derived from the sums it computes: every output is a sum of at most n = B * T0 * F0
products (plus the 9-tap sum inside g0), so with unit roundoff u its error is at most
(n + 10) u times the same sum over absolute values, which the reference computes from |inputs|.
A wrong tap, gate or index moves outputs by O(1) of that scale.
"""

from __future__ import annotations

import pytest
import torch

import streamssl.ops as ops
from streamssl.ops import reference

U = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
HAS_EXTENSION = ops.backend() != "reference"
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")


def _size(n: int, pad: int) -> int:
    return 0 if n + 2 * pad < 3 else (n + 2 * pad - 3) // 2 + 1


def make_inputs(B, T, Fq, C, pad, dtype, seed=0):
    """Random stem inputs; y0 is a ReLU output with exact zeros (the gate) and masked frames."""
    g = torch.Generator().manual_seed(seed)
    T0, F0 = _size(T, pad), _size(Fq, 1)
    T1, F1 = _size(T0, pad), _size(F0, 1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    y0 = rnd(B, T0, F0, C).clamp_min(0)
    if T0 > 2:
        y0[:, -2:] = 0  # padded frames, as the keep mask leaves them
    return rnd(B, T1, F1, C), y0, rnd(B, T, Fq), rnd(C, 3, 3) * 0.3


def assert_within_bound(got, grad_y1, y0, feats, w1, pad):
    dtype = feats.dtype
    d = [t.double() for t in (grad_y1, y0, feats, w1)]
    exact = reference.subsampling_stem_backward(*d, pad)
    scale = reference.subsampling_stem_backward(d[0].abs(), d[1], d[2].abs(), d[3].abs(), pad)
    B, T0, F0, _ = y0.shape
    # The float64 reference carries its own rounding: count it twice for float64 results.
    bound_u = (B * T0 * F0 + 10) * U[dtype] * (2 if dtype == torch.float64 else 1)
    for name, g, e, s in zip(("grad_w0", "grad_b0", "grad_w1"), got, exact, scale):
        assert g.dtype == dtype and g.shape == e.shape, name
        err = (g.double() - e).abs()
        bound = bound_u * s + 1e-300
        assert bool((err <= bound).all()), f"{name}: max error {err.max():.3g}, worst excess {(err - bound).max():.3g}"


CASES = [
    # B, T, F, C, time_padding
    (2, 17, 9, 5, 1),
    (3, 40, 80, 19, 1),
    (1, 8, 5, 3, 0),
    (2, 3, 3, 1, 1),  # one channel, one stage-1 frame
    (2, 33, 7, 16, 0),
    (1, 2, 4, 8, 0),  # no stage-0 frame at all: zero gradients
    (2, 101, 80, 64, 1),  # several tiles, the AVX2 loop's full width
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_matches_the_reference_within_the_summation_bound(case, dtype):
    B, T, Fq, C, pad = case
    args = make_inputs(B, T, Fq, C, pad, dtype)
    got = ops.subsampling_stem_backward(*args, pad)
    assert_within_bound(got, *args, pad)


@needs_extension
def test_any_strides_and_the_same_bits_for_every_thread_count():
    grad_y1, y0, feats, w1 = make_inputs(2, 101, 80, 64, 1, torch.float32, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.subsampling_stem_backward(grad_y1, y0, feats, w1, 1)
        torch.set_num_threads(2)
        # Channels-last views of NCHW-shaped tensors, as the encoder passes them.
        two = ops.subsampling_stem_backward(grad_y1.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
                                            y0.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), feats, w1, 1)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


BAD = [
    (lambda a: {**a, "time_padding": 2}, "time_padding"),
    (lambda a: {**a, "feats": a["feats"][0]}, "feats"),
    (lambda a: {**a, "feats": a["feats"].half()}, "feats"),
    (lambda a: {**a, "y0": a["y0"][:, :-1]}, "y0"),
    (lambda a: {**a, "y0": a["y0"].double()}, "y0"),
    (lambda a: {**a, "grad_y1": a["grad_y1"][:, :, :-1]}, "grad_y1"),
    (lambda a: {**a, "w1": a["w1"][:, :2]}, "w1"),
]


@pytest.mark.parametrize("mutate,name", BAD)
def test_bad_arguments_name_the_argument(mutate, name):
    g1, y0, feats, w1 = make_inputs(2, 17, 9, 5, 1, torch.float32)
    a = mutate({"grad_y1": g1, "y0": y0, "feats": feats, "w1": w1, "time_padding": 1})
    with pytest.raises(ValueError, match=name):
        ops.subsampling_stem_backward(a["grad_y1"], a["y0"], a["feats"], a["w1"], a["time_padding"])


@needs_extension
def test_opcheck():
    args = make_inputs(2, 17, 9, 5, 1, torch.float32)
    torch.library.opcheck(torch.ops.streamssl.subsampling_stem_backward.default, (*args, 1))
    args = make_inputs(1, 8, 5, 3, 0, torch.float64)
    torch.library.opcheck(torch.ops.streamssl.subsampling_stem_backward.default, (*args, 0))


@needs_extension
@pytest.mark.parametrize("factor", [4, 8])
def test_training_through_the_fused_stem_gives_the_composition_gradients(factor):
    """CausalStridingSubsampling trains through the fused stem when the features take no gradient:
    the output is bit-identical to the stage-by-stage pass, and every parameter gradient equals the
    NCHW composition's in float64 (within the summation-order bound of the layout test in
    test_encoder.py: n u with n = 3 x 51 x 40 = 6120 terms of O(1), about 7e-13)."""
    from streamssl.nn.subsampling import CausalStridingSubsampling
    from test_encoder import _nchw_subsampling

    torch.manual_seed(0)
    m = CausalStridingSubsampling(80, 64, factor, 32).double()
    feats, lengths = torch.randn(3, 101, 80, dtype=torch.float64), torch.tensor([101, 64, 9])
    assert m._fused_stem_applies(feats.unsqueeze(1))
    out = m(feats, lengths)[0]
    with torch.no_grad():
        assert not m._fused_stem_applies(feats.unsqueeze(1))
        assert torch.equal(m(feats, lengths)[0], out)  # the stage-by-stage pass, same bits
    m.eval()
    assert not m._fused_stem_applies(feats.unsqueeze(1))  # evaluation runs stage by stage
    m.train()
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    g = g * (torch.arange(out.shape[1]) < m.output_lengths(lengths)[:, None])[..., None]
    fused = torch.autograd.grad(out, list(m.parameters()), g)
    plain = torch.autograd.grad(_nchw_subsampling(m, feats, lengths), list(m.parameters()), g)
    for (name, p), a, b in zip(m.named_parameters(), fused, plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)
        assert a.stride() == p.stride(), f"{name}: DDP's buckets expect the parameter's strides"


def test_the_fused_stem_is_not_used_when_the_features_need_a_gradient():
    from streamssl.nn.subsampling import CausalStridingSubsampling

    m = CausalStridingSubsampling(80, 64, 8, 32)
    x = torch.randn(2, 1, 40, 80, requires_grad=True)
    assert not m._fused_stem_applies(x)
    assert not CausalStridingSubsampling(80, 64, 2, 32)._fused_stem_applies(x.detach())  # one stage only


def test_cpu_autocast_runs_the_convolutions_in_float32(monkeypatch):
    """Under CPU bf16 autocast the convolution stages run in float32 (the same bits as without
    autocast, fused stem included) and only the projection after them follows autocast; the
    streaming step does the same."""
    from streamssl.nn.subsampling import CausalStridingSubsampling

    torch.manual_seed(0)
    m = CausalStridingSubsampling(80, 64, 8, 32)
    feats, lengths = torch.randn(2, 64, 80), torch.tensor([64, 50])
    seen = []
    project = m._project
    monkeypatch.setattr(m, "_project", lambda x: seen.append(x) or project(x))
    plain = m(feats, lengths)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = m(feats, lengths)[0]
        m.eval()
        cache = m.init_cache(2)
        m.step(feats[:, :8], torch.tensor([8, 8]), cache)
    assert plain.dtype == torch.float32 and mixed.dtype == torch.bfloat16
    assert seen[1].dtype == torch.float32 and torch.equal(seen[0], seen[1])
    assert seen[2].dtype == torch.float32
