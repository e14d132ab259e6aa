"""CausalConvModule: equals the stock-layer composition, streams exactly, ignores padding."""

import pytest
import torch

from streamssl.nn import CausalConvModule, PlainConvModule


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_plain(D, K, dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    plain = PlainConvModule(D, K, bias=bias).to(dtype)
    with torch.no_grad():
        for p in plain.parameters():  # LayerNorm starts at (1, 0); randomise so every parameter matters
            p.copy_(torch.randn_like(p) * 0.5)
    return plain


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("D,K", [(16, 9), (7, 1), (5, 3), (12, 31)])
def test_matches_plain_composition_float64(D, K, bias):
    plain = _random_plain(D, K, bias=bias)
    mod = CausalConvModule.from_plain(plain)
    x = torch.randn(3, 20, D, dtype=torch.float64)
    # float64 all the way: only summation order differs (conv1d vs linear), ~1e-15 relative.
    torch.testing.assert_close(mod(x), plain(x), rtol=1e-12, atol=1e-12)


def test_matches_plain_composition_float32_and_gradients():
    plain64 = _random_plain(24, 9)
    plain = _random_plain(24, 9).float()
    mod = CausalConvModule.from_plain(plain)
    assert mod.ln_weight.dtype == torch.float32
    x = torch.randn(2, 33, 24, requires_grad=True)
    y, y_ref = mod(x), plain(x)
    # float32: eps 1.2e-7 times sums of ~2D products of O(1) terms, through LayerNorm's 1/std.
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # Gradients in float64 (tight): every parameter of the module against its plain counterpart.
    mod64 = CausalConvModule.from_plain(plain64)
    x64 = x.detach().double().requires_grad_()
    g = torch.randn(2, 33, 24, dtype=torch.float64)
    (mod64(x64) * g).sum().backward()
    x64_ref = x64.detach().clone().requires_grad_()
    (plain64(x64_ref) * g).sum().backward()
    torch.testing.assert_close(x64.grad, x64_ref.grad, rtol=1e-10, atol=1e-10)
    pairs = {
        "pointwise1.weight": plain64.pointwise_conv1.weight.grad[:, :, 0],
        "pointwise1.bias": plain64.pointwise_conv1.bias.grad,
        "dw_weight": plain64.depthwise_conv.weight.grad[:, 0, :],
        "dw_bias": plain64.depthwise_conv.bias.grad,
        "ln_weight": plain64.norm.weight.grad,
        "ln_bias": plain64.norm.bias.grad,
        "pointwise2.weight": plain64.pointwise_conv2.weight.grad[:, :, 0],
        "pointwise2.bias": plain64.pointwise_conv2.bias.grad,
    }
    grads = dict(mod64.named_parameters())
    assert set(grads) == set(pairs)
    for name, ref in pairs.items():
        torch.testing.assert_close(grads[name].grad, ref, rtol=1e-10, atol=1e-10, msg=name)


def test_to_plain_round_trip_and_nemo_key_alias():
    mod = CausalConvModule.from_plain(_random_plain(10, 5))
    plain = mod.to_plain()
    x = torch.randn(2, 9, 10, dtype=torch.float64)
    torch.testing.assert_close(plain(x), mod(x), rtol=1e-12, atol=1e-12)
    # NeMo names the LayerNorm of its conv module "batch_norm"; both spellings load.
    sd = {k.replace("norm.", "batch_norm.") if k.startswith("norm.") else k: v for k, v in plain.state_dict().items()}
    other = CausalConvModule(10, 5).double()
    other.load_plain_state_dict(sd)
    torch.testing.assert_close(other(x), mod(x), rtol=0, atol=0)


def test_reference_impl_is_the_same_function():
    plain = _random_plain(8, 9).float()
    a, b = CausalConvModule.from_plain(plain), CausalConvModule.from_plain(plain, impl="reference")
    x = torch.randn(2, 15, 8)
    torch.testing.assert_close(a(x), b(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("K", [1, 4, 9])
def test_step_over_random_chunkings_equals_forward(K):
    mod = CausalConvModule.from_plain(_random_plain(12, K))
    gen = torch.Generator().manual_seed(K)
    x = torch.randn(3, 40, 12, dtype=torch.float64, generator=gen)
    full = mod(x)
    for _ in range(3):
        cuts = sorted(torch.randperm(39, generator=gen)[:6].add(1).tolist())
        cache, outs, start = None, [], 0
        for end in cuts + [40]:
            y, cache = mod.step(x[:, start:end], cache)
            assert cache.shape == (3, K - 1, 12) and not cache.requires_grad
            outs.append(y)
            start = end
        # Same arithmetic per frame in float64; only matmul blocking may differ.
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)


def test_padded_frames_are_zeroed_and_padding_content_is_ignored():
    mod = CausalConvModule.from_plain(_random_plain(6, 5))
    x = torch.randn(3, 12, 6, dtype=torch.float64)
    lengths = torch.tensor([12, 7, 1])
    y = mod(x, lengths)
    x2 = x.clone()
    for b, n in enumerate(lengths.tolist()):
        x2[b, n:] = 1e3 * torch.randn_like(x2[b, n:])  # garbage in the padding
    y2 = mod(x2, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(y[b, n:] == 0) and torch.all(y2[b, n:] == 0)
        alone = mod(x[b : b + 1, :n])
        torch.testing.assert_close(y[b, :n], alone[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y2[b, :n], alone[0], rtol=1e-12, atol=1e-12)


def test_bad_inputs_name_the_argument():
    mod = CausalConvModule(8, 5)
    with pytest.raises(ValueError, match="x must have shape"):
        mod(torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match="lengths"):
        mod(torch.randn(2, 4, 8), torch.tensor([4]))
    with pytest.raises(ValueError, match="cache must have shape"):
        mod.step(torch.randn(2, 4, 8), torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="kernel_size"):
        CausalConvModule(8, 0)
    with pytest.raises(ValueError, match="impl"):
        CausalConvModule(8, 3, impl="cuda")
    with pytest.raises(ValueError, match="depthwise_conv.weight"):
        sd = CausalConvModule(8, 5).to_plain().state_dict()
        sd["depthwise_conv.weight"] = torch.zeros(8, 1, 4)
        mod.load_plain_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        mod.load_plain_state_dict({})
