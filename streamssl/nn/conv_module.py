"""The Conformer convolution module, causal: pointwise → GLU → depthwise conv → LayerNorm → Swish → pointwise.

The middle (causal depthwise conv + LayerNorm + Swish) runs through ``streamssl.ops.causal_dwconv_ln``,
which serves both training (any T) and streaming (a chunk plus a (B, K-1, D) cache). There is no
BatchNorm: its batch statistics break streaming and make outputs depend on the batch.

``PlainConvModule`` is the same computation written with stock layers (``nn.Conv1d`` pointwise and
depthwise convs, ``nn.LayerNorm``, ``nn.SiLU``) on the (B, D, T) layout other toolkits use. It is the
interchange format (``CausalConvModule.from_plain`` / ``to_plain`` / ``load_plain_state_dict``) and the
reference the tests compare with.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops

_IMPLS = ("op", "reference")


def _dwconv_ln(impl: str):
    return ops.causal_dwconv_ln if impl == "op" else ops.reference.causal_dwconv_ln


def valid_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) bool: True at frames t < lengths[b]. Built on lengths' device, no host sync."""
    return torch.arange(T, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class CausalConvModule(nn.Module):
    """Causal Conformer convolution module on (B, T, D) tensors.

    ``y = W2 · swish(LN(dwconv_causal(GLU(W1 · x + b1)))) + b2``: ``W1`` maps D to 2D, GLU halves it
    back to D (first half times sigmoid of the second), the depthwise conv has ``kernel_size`` taps
    that see the current frame and the K-1 before it, LayerNorm is over channels per frame.

    Args:
        d_model: channels D.
        kernel_size: depthwise taps K (>= 1).
        bias: whether the two pointwise layers and the depthwise conv have biases.
        eps: LayerNorm epsilon.
        impl: ``"op"`` (``streamssl.ops.causal_dwconv_ln``, the fused kernels when built) or
            ``"reference"`` (``streamssl.ops.reference.causal_dwconv_ln``, pure PyTorch; for
            benchmarks and debugging). Both compute the same function.
    """

    def __init__(self, d_model: int, kernel_size: int, *, bias: bool = True, eps: float = 1e-5, impl: str = "op"):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        self.d_model = d_model
        self.kernel_size = kernel_size
        self.eps = eps
        self.impl = impl
        self.pointwise1 = nn.Linear(d_model, 2 * d_model, bias=bias)
        # (D, K) is the op's layout; tap K-1 multiplies the current frame, tap 0 the oldest one.
        self.dw_weight = nn.Parameter(torch.empty(d_model, kernel_size))
        self.dw_bias = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.ln_weight = nn.Parameter(torch.ones(d_model))
        self.ln_bias = nn.Parameter(torch.zeros(d_model))
        self.pointwise2 = nn.Linear(d_model, d_model, bias=bias)
        # Same initialisation as nn.Conv1d(D, D, K, groups=D): fan_in = K.
        nn.init.kaiming_uniform_(self.dw_weight, a=5**0.5)
        if self.dw_bias is not None:
            bound = 1.0 / kernel_size**0.5
            nn.init.uniform_(self.dw_bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, kernel_size={self.kernel_size}, impl={self.impl!r}"

    def _middle(self, h: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return _dwconv_ln(self.impl)(
            h.contiguous(), self.dw_weight, self.dw_bias, self.ln_weight, self.ln_bias, cache, eps=self.eps
        )

    def _check_x(self, x: torch.Tensor, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape (B, T, {self.d_model}), got {shape}")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence forward.

        Args:
            x: (B, T, D) float.
            lengths: (B,) int64 valid frames per row, or None (all valid). Frames at t >= lengths[b]
                are zeroed before the depthwise conv (so they cannot leak into valid frames whatever
                the padding holds) and in the output.
        Returns:
            (B, T, D) in x's dtype.
        """
        self._check_x(x)
        B, T, _ = x.shape
        valid = None
        if lengths is not None:
            if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,):
                raise ValueError(f"lengths must be a (B,) = ({B},) tensor, got {getattr(lengths, 'shape', lengths)}")
            valid = valid_mask(lengths.to(x.device), T).unsqueeze(-1)
        h = F.glu(self.pointwise1(x), dim=-1)
        if valid is not None:
            h = h.masked_fill(~valid, 0.0)
        y = self.pointwise2(self._middle(h, None)[0])
        if valid is not None:
            y = y.masked_fill(~valid, 0.0)
        return y

    def step(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming step: the next frames of a sequence and the cache the previous step returned.

        Args:
            x: (B, t, D) float, t >= 1.
            cache: (B, K-1, D) GLU outputs of the K-1 frames before x, or None at the start (zeros,
                as ``forward`` pads).
        Returns:
            y: (B, t, D), equal to the matching frames of ``forward`` on the whole sequence.
            new_cache: (B, K-1, D) for the next step (no gradient).
        """
        self._check_x(x)
        if x.shape[1] < 1:
            raise ValueError(f"x must have at least one frame, got shape {tuple(x.shape)}")
        if cache is not None and (
            not isinstance(cache, torch.Tensor) or tuple(cache.shape) != (x.shape[0], self.kernel_size - 1, self.d_model)
        ):
            raise ValueError(
                f"cache must have shape (B, K-1, D) = ({x.shape[0]}, {self.kernel_size - 1}, {self.d_model}), "
                f"got {tuple(getattr(cache, 'shape', ()))}"
            )
        h = F.glu(self.pointwise1(x), dim=-1)
        z, new_cache = self._middle(h, None if cache is None else cache.to(h.dtype))
        return self.pointwise2(z), new_cache

    def init_cache(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        """(batch_size, K-1, D) zeros: the cache before the first frame."""
        p = self.ln_weight
        return torch.zeros(
            batch_size, self.kernel_size - 1, self.d_model, device=device or p.device, dtype=dtype or p.dtype
        )

    # ---- plain layout -------------------------------------------------------------------------

    @torch.no_grad()
    def load_plain_state_dict(self, state_dict: dict) -> None:
        """Load weights from ``PlainConvModule.state_dict()`` (keys ``pointwise_conv1.*``,
        ``depthwise_conv.*``, ``norm.*``, ``pointwise_conv2.*``; ``batch_norm.*`` is accepted for
        ``norm.*``, the name NeMo keeps for its LayerNorm variant). Shapes are checked."""
        sd = {("norm." + k[len("batch_norm.") :] if k.startswith("batch_norm.") else k): v for k, v in state_dict.items()}
        D, K = self.d_model, self.kernel_size
        expected = {
            "pointwise_conv1.weight": (2 * D, D, 1),
            "depthwise_conv.weight": (D, 1, K),
            "norm.weight": (D,),
            "norm.bias": (D,),
            "pointwise_conv2.weight": (D, D, 1),
        }
        if self.pointwise1.bias is not None:
            expected.update({"pointwise_conv1.bias": (2 * D,), "depthwise_conv.bias": (D,), "pointwise_conv2.bias": (D,)})
        unexpected = sorted(set(sd) - set(expected))
        missing = sorted(set(expected) - set(sd))
        if missing or unexpected:
            raise ValueError(f"state_dict does not match the plain layout: missing {missing}, unexpected {unexpected}")
        for key, shape in expected.items():
            if tuple(sd[key].shape) != shape:
                raise ValueError(f"state_dict[{key!r}] must have shape {shape}, got {tuple(sd[key].shape)}")
        self.pointwise1.weight.copy_(sd["pointwise_conv1.weight"][:, :, 0])
        self.dw_weight.copy_(sd["depthwise_conv.weight"][:, 0, :])
        self.ln_weight.copy_(sd["norm.weight"])
        self.ln_bias.copy_(sd["norm.bias"])
        self.pointwise2.weight.copy_(sd["pointwise_conv2.weight"][:, :, 0])
        if self.pointwise1.bias is not None:
            self.pointwise1.bias.copy_(sd["pointwise_conv1.bias"])
            self.dw_bias.copy_(sd["depthwise_conv.bias"])
            self.pointwise2.bias.copy_(sd["pointwise_conv2.bias"])

    @classmethod
    def from_plain(cls, plain: "PlainConvModule", *, impl: str = "op") -> "CausalConvModule":
        """A CausalConvModule computing the same function as ``plain``, on plain's device and dtype."""
        p = plain.norm.weight
        m = cls(plain.d_model, plain.kernel_size, bias=plain.pointwise_conv1.bias is not None, eps=plain.norm.eps, impl=impl)
        m.to(device=p.device, dtype=p.dtype)
        m.load_plain_state_dict(plain.state_dict())
        return m

    @torch.no_grad()
    def to_plain(self) -> "PlainConvModule":
        """The same function as a ``PlainConvModule`` (a copy, on this module's device and dtype)."""
        p = self.ln_weight
        plain = PlainConvModule(self.d_model, self.kernel_size, bias=self.pointwise1.bias is not None, eps=self.eps)
        plain.to(device=p.device, dtype=p.dtype)
        plain.pointwise_conv1.weight.copy_(self.pointwise1.weight.unsqueeze(-1))
        plain.depthwise_conv.weight.copy_(self.dw_weight.unsqueeze(1))
        plain.norm.weight.copy_(self.ln_weight)
        plain.norm.bias.copy_(self.ln_bias)
        plain.pointwise_conv2.weight.copy_(self.pointwise2.weight.unsqueeze(-1))
        if self.pointwise1.bias is not None:
            plain.pointwise_conv1.bias.copy_(self.pointwise1.bias)
            plain.depthwise_conv.bias.copy_(self.dw_bias)
            plain.pointwise_conv2.bias.copy_(self.pointwise2.bias)
        return plain


class PlainConvModule(nn.Module):
    """The causal convolution module written with stock layers, on (B, T, D) input.

    ``nn.Conv1d(D, 2D, 1)`` → GLU over channels → ``nn.Conv1d(D, D, K, groups=D)`` with K-1 zeros
    padded on the left (causal) → ``nn.LayerNorm(D)`` → ``nn.SiLU`` → ``nn.Conv1d(D, D, 1)``.
    Internally (B, D, T) like the toolkits this layout comes from; no padding mask (it is the
    reference composition, not a training module).
    """

    def __init__(self, d_model: int, kernel_size: int, *, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.d_model = d_model
        self.kernel_size = kernel_size
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=bias)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, bias=bias)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.activation = nn.SiLU()
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        h = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        h = self.depthwise_conv(F.pad(h, (self.kernel_size - 1, 0)))
        h = self.activation(self.norm(h.transpose(1, 2)))
        return self.pointwise_conv2(h.transpose(1, 2)).transpose(1, 2)
