"""Block-wise weight quantization math, in ONNX Runtime MatMulNBits' storage format.

A weight ``W[N, K]`` (nn.Linear's (out, in)) is cut along K into ``n_blocks = ceil(K / B)``
blocks of ``B = block_size`` values; K is zero-padded up to ``n_blocks * B`` so a width that
``B`` does not divide (SmolLM2's 576 with B = 128: 4 full blocks and one of 64 + 64 zeros) is
quantized like any other, never skipped. Each block has one float scale and, asymmetric, one
integer zero point or one float minimum; codes are unsigned ``bits``-bit integers::

    symmetric:   scale = max|w| / qmax_s,  qmax_s = 2^(bits-1) - 1   (7 for int4, 127 for int8)
                 code  = clamp(round(w / scale), -qmax_s, qmax_s) + 2^(bits-1)
                 (zero point 2^(bits-1): MatMulNBits' default, so none is stored)
    asymmetric:  lo, hi = min(w_min, 0), max(w_max, 0)      (0 stays exactly representable,
                 scale = (hi - lo) / (2^bits - 1)            so the zero padding costs nothing)
                 zero  = clamp(round(-lo / scale), 0, 2^bits - 1)
                 code  = clamp(round(w / scale) + zero, 0, 2^bits - 1)
    dequantized: w' = (code - zero) * scale,   |w - w'| <= scale / 2 for every element

    float minimum (llama.cpp's Q4_1: w' = d * code + m, with float d and m per block):
                 lo, hi = w_min, w_max          (the real elements only, not the padding)
                 scale  = (hi - lo) / (2^bits - 1)
                 code   = clamp(round((w - lo) / scale), 0, 2^bits - 1)
                 stored as the symmetric form plus a float offset per block,
                 offset = lo + 2^(bits-1) * scale,
    dequantized: w' = (code - 2^(bits-1)) * scale + offset   (= code * scale + lo)

The float minimum is what a Q4_1 GGUF holds, so weights dequantized from one (SmolLM2's
here) come back exactly (to float rounding), which no integer zero point can do: the block's
minimum is rarely a whole number of steps from 0. MatMulNBits takes the symmetric part at its
fast path; the offsets add ``blocksum(x) @ offsets`` (``arc.matmul_nbits``' docstring).

Round-to-nearest (ties to even, torch.round). A block of zeros gets scale 1 (its codes are
the zero point, so it dequantizes to exact zeros).

Storage (what MatMulNBits reads): codes packed low bits first along K within each block,
``uint8 [N, n_blocks, B * bits / 8]`` (int4: element 2i in the low nibble of byte i); scales
``float [N * n_blocks]``; zero points packed the same way per row,
``uint8 [N, ceil(n_blocks * bits / 8)]`` (a row's last byte is padded, not shared with the
next row: ORT 1.32 refuses the flat packing when n_blocks is odd); block offsets
``float [n_blocks, N]`` (transposed, as the correction's MatMul reads them).

The calibrated method (AWQ-style scaling) reuses ``quantize`` on a scaled weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8)  # bit widths that pack whole codes into a byte


@dataclass
class QuantizedWeight:
    """A weight ``[N, K]`` quantized block-wise, in MatMulNBits' layout (module docstring)."""

    packed: torch.Tensor  # uint8 [N, n_blocks, block_size * bits / 8]
    scales: torch.Tensor  # float [N * n_blocks]
    zero_points: torch.Tensor | None  # uint8 [N, ceil(n_blocks * bits / 8)]; None: symmetric
    K: int
    N: int
    bits: int
    block_size: int
    block_offsets: torch.Tensor | None = None  # float [n_blocks, N]: the float-minimum form

    @property
    def n_blocks(self) -> int:
        return blocks_of(self.K, self.block_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[N, K]`` these codes stand for."""
        return dequantize(self.packed, self.scales, self.zero_points, self.K, self.bits,
                          self.block_size, dtype, self.block_offsets)


def blocks_of(K: int, block_size: int) -> int:
    return -(-K // block_size)


def check_format(bits: int, block_size: int) -> None:
    """Raise ValueError unless MatMulNBits can hold this format (ORT 1.32, CPU)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def quantize(weight_NK: torch.Tensor, bits: int, block_size: int, symmetric: bool = True,
             float_minimum: bool = False) -> QuantizedWeight:
    """Round-to-nearest block-wise quantization of ``weight_NK`` (float ``[N, K]``):
    symmetric, asymmetric with integer zero points, or (``float_minimum``, which needs
    ``symmetric=False``) asymmetric with a float minimum per block."""
    check_format(bits, block_size)
    if weight_NK.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(weight_NK.shape)}")
    if float_minimum:
        if symmetric:
            raise ValueError("a float minimum is asymmetric: pass symmetric=False")
        return _quantize_float_minimum(weight_NK, bits, block_size)
    N, K = weight_NK.shape
    nb = blocks_of(K, block_size)
    w = torch.zeros(N, nb * block_size, dtype=torch.float32)
    w[:, :K] = weight_NK.detach().float()
    w_NbB = w.reshape(N, nb, block_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = w_NbB.abs().amax(-1) / qmax  # [N, nb]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(w_NbB / scale[..., None]), -qmax, qmax) + 2 ** (bits - 1)
        zero = None
    else:
        qmax = 2 ** bits - 1
        lo = w_NbB.amin(-1).clamp(max=0)
        hi = w_NbB.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
        q = torch.clamp(torch.round(w_NbB / scale[..., None]) + zero[..., None], 0, qmax)
    codes = q.to(torch.uint8)
    return QuantizedWeight(
        packed=pack(codes, bits), scales=scale.reshape(-1).to(weight_NK.dtype).contiguous(),
        zero_points=pack(zero.to(torch.uint8), bits) if zero is not None else None,
        K=K, N=N, bits=bits, block_size=block_size)


def _quantize_float_minimum(weight_NK: torch.Tensor, bits: int,
                            block_size: int) -> QuantizedWeight:
    """The float-minimum form (module docstring). Only the real elements set a block's
    range; the padding past K repeats the row's last code, which no product reads (x has
    only K elements and ``block_sums`` pads it with zeros)."""
    N, K = weight_NK.shape
    nb = blocks_of(K, block_size)
    qmax, mid = 2 ** bits - 1, 2 ** (bits - 1)
    w = weight_NK.detach().float()
    # pad with a copy of each row's last real element: it leaves min and max as they are
    w = torch.cat([w, w[:, -1:].expand(N, nb * block_size - K)], 1)
    w_NbB = w.reshape(N, nb, block_size)
    lo = w_NbB.amin(-1)  # [N, nb]
    scale = (w_NbB.amax(-1) - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant block: codes 0
    q = torch.clamp(torch.round((w_NbB - lo[..., None]) / scale[..., None]), 0, qmax)
    offsets = lo + mid * scale
    return QuantizedWeight(
        packed=pack(q.to(torch.uint8), bits), scales=scale.reshape(-1).contiguous(),
        zero_points=None, K=K, N=N, bits=bits, block_size=block_size,
        block_offsets=offsets.t().contiguous())


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
               K: int, bits: int, block_size: int, dtype: torch.dtype = torch.float32,
               block_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``(code - zero) * scale (+ offset)`` as a float ``[N, K]`` weight (padding dropped)."""
    N, nb = packed.shape[0], packed.shape[1]
    codes = unpack(packed, bits).float()  # [N, nb, block_size]
    if zero_points is None:
        zero = torch.full((N, nb), float(2 ** (bits - 1)))
    else:
        zero = unpack(zero_points, bits)[:, :nb].float()
    w = (codes - zero[..., None]) * scales.reshape(N, nb, 1).float()
    if block_offsets is not None:
        w = w + block_offsets.t().reshape(N, nb, 1).float()
    return w.reshape(N, nb * block_size)[:, :K].to(dtype)


def block_sums(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x[..., K]`` zero-padded to whole blocks and summed per block: ``[..., n_blocks]``.
    ``block_sums(x) @ offsets_bN`` is the float-minimum form's correction."""
    K = x.shape[-1]
    nb = blocks_of(K, block_size)
    padded = torch.nn.functional.pad(x, (0, nb * block_size - K))
    return padded.reshape(*x.shape[:-1], nb, block_size).sum(-1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along the last dim, low bits first: ``[..., L]`` uint8
    becomes ``[..., ceil(L * bits / 8)]`` uint8 (the last byte zero-padded)."""
    per = 8 // bits
    length = codes.shape[-1]
    padded = -(-length // per) * per
    if padded != length:
        codes = torch.nn.functional.pad(codes, (0, padded - length))
    groups = codes.to(torch.int32).reshape(*codes.shape[:-1], padded // per, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (groups << shifts).sum(-1).to(torch.uint8).contiguous()


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of ``pack``: ``[..., L]`` uint8 -> ``[..., L * 8 / bits]`` codes (uint8)."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


def quantize_activations_int8(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """What MatMulNBits does to its input A at ``accuracy_level=4`` on CPU, in float: per
    block of ``block_size`` along the last dim, ``scale = max|a| / 127`` and
    ``a' = round(a / scale) * scale`` (ties to even). Matched ORT 1.32's CPU kernels within
    5e-7 relative on this machine (bits 4 and 8, blocks 16..256, K 64..1536)."""
    K = x.shape[-1]
    nb = blocks_of(K, block_size)
    flat = x.reshape(-1, K).float()
    padded = torch.zeros(flat.shape[0], nb * block_size, dtype=torch.float32)
    padded[:, :K] = flat
    blocks = padded.reshape(-1, nb, block_size)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round(blocks * inverse) * scale
    return q.reshape(-1, nb * block_size)[:, :K].reshape(x.shape).to(x.dtype)
