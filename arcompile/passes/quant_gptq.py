"""GPTQ (Frantar et al., 2022): block-wise weight quantization that corrects each rounding
error with the weights not yet quantized, using the inputs' second moment ``H = E[x^T x]``
measured on calibration text. Produces the same storage as round-to-nearest
(``quant_math.QuantizedWeight``: MatMulNBits' codes, scales, integer zero points or float
minima), so the lowering does not know which method made the codes.

What it minimizes, per linear ``y = x @ W^T`` (W ``[N, K]``), over codes on the block grids::

    E || x @ (W - Q)^T ||^2  =  sum_n (W - Q)[n] @ H @ (W - Q)[n]^T,   H[K, K] = E[x^T x]

1. grids: each block's (scale, zero point or float minimum) from the float weights, by
   ``quant_math``'s formulas applied to the block's range shrunk or widened by each factor in
   ``RANGE_FACTORS``; per row, the factor with the least ``sum_k H[k, k] (w_k - q_k)^2``
   (round-to-nearest's error, weighted by how large each input is). Fixed before any
   correction (the paper's "static groups"), which the column order below needs.
2. order: columns by decreasing ``H[k, k]`` (the paper's "act order"): the largest inputs'
   errors are fixed first, while the most columns are left to absorb them.
3. columns, in that order (all N rows at once), with ``U`` the upper Cholesky factor of
   ``(H + damp * mean(diag H) * I)^-1`` in the same order::

       q_k  = grid_k(w_k)                    round-to-nearest on the column's block grid
       e_k  = (w_k - q_k) / U[k, k]
       w_j -= e_k * U[k, j]   for every j after k      (batched per COLUMNS_PER_UPDATE)

What it is for here: SmolLM2 comes from a Q4_1 GGUF (w = d * q + m per block of 32), and
MatMulNBits' integer zero point cannot hold m, so round-to-nearest leaves every element of a
block off by about the same amount, an error correlated across the block that the correction
cancels on other columns. Measured on SmolLM2 (int4 g32, integer zero point, 512 held tokens,
fp32 12.786, 16 x 128 calibration tokens): round-to-nearest 16.06; GPTQ with grids from the
corrected weights and the natural order 13.97, act order 13.45, searched grids 13.41, both
(these defaults) 13.24; the searched grids alone, no correction, 15.90. ``damp`` 0.1: 14.07.

Numbers: every element of ``Q`` is on its block's grid; ``Q`` may be further from ``W`` than
round-to-nearest's (by design: the product on the calibration inputs is closer).
Deterministic for the same weight and ``H`` (one thread, fixed order; ties in ``diag H``
keep their column order).

Refuses (ValueError): a weight that is not 2-D, a Hessian that is not ``[K, K]``, a format
MatMulNBits cannot hold (``quant_math.check_format``), a zero point option it does not know.
"""

from __future__ import annotations

import torch

from arcompile.ir.quant_math import QuantizedWeight, blocks_of, check_format, pack

DEFAULT_DAMP = 0.01  # times the mean of diag(H), added to H's diagonal (the paper's 1%)
COLUMNS_PER_UPDATE = 32  # columns corrected one by one before one matmul updates the rest
# grid search: the block's range times each factor (1.0 is round-to-nearest's grid)
RANGE_FACTORS = tuple(1.0 - 0.02 * i for i in range(13)) + (1.02, 1.04, 1.06)
ZERO_POINTS = ("none", "int", "float")


class SecondMoment:
    """A running ``E[x^T x]`` (``[K, K]``) over every row of the ``x`` tensors added
    (``x[..., K]``): each tensor's product in float32 (a sequence's 128 rows lose nothing
    that matters, at a quarter of float64's time), the running sum in float64."""

    def __init__(self, K: int):
        self.K = K
        self.xtx = torch.zeros(K, K, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, self.K).float()
        self.xtx += (x2.t() @ x2).double()
        self.rows += x2.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """``E[x^T x]``, float32 ``[K, K]``."""
        return (self.xtx / max(self.rows, 1)).float()


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  shift: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized values) of ``w`` on the grid ``(code - zero) * scale + shift``,
    codes ``0 .. 2^bits - 1``; ``scale``/``zero``/``shift`` broadcast against ``w``."""
    code = torch.clamp(torch.round((w - shift) / scale) + zero, 0, 2 ** bits - 1)
    return code, (code - zero) * scale + shift


def block_grid(w_NG: torch.Tensor, bits: int, zero_point: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, zero, shift), each ``[N]``, of one block of columns ``w_NG`` by
    ``quant_math``'s round-to-nearest formulas: the grid ``(code - zero) * scale + shift``,
    shift 0 but for the float minimum (``shift = lo + 2^(bits-1) * scale``)."""
    qmax, mid = 2 ** bits - 1, 2 ** (bits - 1)
    if zero_point == "none":  # scale = max|w| / (2^(bits-1) - 1), zero 2^(bits-1)
        scale = w_NG.abs().amax(-1) / (mid - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, float(mid)), torch.zeros_like(scale)
    if zero_point == "int":  # lo <= 0 <= hi, so 0 stays representable
        lo, hi = w_NG.amin(-1).clamp(max=0), w_NG.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.clamp(torch.round(-lo / scale), 0, qmax), torch.zeros_like(scale)
    if zero_point == "float":  # Q4_1: code * scale + lo, stored as (code - mid) * scale + shift
        lo = w_NG.amin(-1)
        scale = (w_NG.amax(-1) - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, float(mid)), lo + mid * scale
    raise ValueError(f"zero_point must be one of {ZERO_POINTS}, got {zero_point!r}")


def searched_grid(w_NG: torch.Tensor, importance_G: torch.Tensor, bits: int, zero_point: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block_grid`` of ``w_NG * f`` for the factor ``f`` in ``RANGE_FACTORS`` whose
    round-to-nearest error ``sum_g importance_g (w_g - q_g)^2`` is least, per row."""
    best, best_err = None, None
    for f in RANGE_FACTORS:
        grid = block_grid(w_NG * f, bits, zero_point)
        _, q = round_to_grid(w_NG, *(t[:, None] for t in grid), bits)
        err = ((w_NG - q) ** 2 * importance_G).sum(-1)
        if best is None:
            best, best_err = grid, err
            continue
        better = err < best_err  # ties keep the earlier factor (1.0 first)
        best_err = torch.where(better, err, best_err)
        best = tuple(torch.where(better, new, old) for new, old in zip(grid, best))
    return best


def gptq(weight_NK: torch.Tensor, hessian_KK: torch.Tensor, bits: int, block_size: int,
         zero_point: str, damp: float = DEFAULT_DAMP) -> QuantizedWeight:
    """``weight_NK`` quantized by GPTQ against ``hessian_KK`` (module docstring), in the
    storage ``quant_math.quantize`` gives for the same ``bits`` / ``block_size`` /
    ``zero_point`` ("none", "int" or "float")."""
    check_format(bits, block_size)
    if zero_point not in ZERO_POINTS:
        raise ValueError(f"zero_point must be one of {ZERO_POINTS}, got {zero_point!r}")
    if weight_NK.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(weight_NK.shape)}")
    K = weight_NK.shape[1]
    if tuple(hessian_KK.shape) != (K, K):
        raise ValueError(f"the Hessian is {tuple(hessian_KK.shape)}, the weight needs ({K}, {K})")
    # one column at a time is thousands of small ops: threads cost more than they save (on a
    # busy 2-core machine 20x more), and one thread keeps the result independent of them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight_NK, hessian_KK, bits, block_size, zero_point, damp)
    finally:
        torch.set_num_threads(threads)


def _gptq(weight_NK: torch.Tensor, hessian_KK: torch.Tensor, bits: int, block_size: int,
          zero_point: str, damp: float) -> QuantizedWeight:
    N, K = weight_NK.shape
    nb = blocks_of(K, block_size)
    W = weight_NK.detach().float().clone()
    H = hessian_KK.detach().float().clone()
    dead = torch.diagonal(H) <= 0  # an input that was always 0: its column cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diagonal(H).mean() * torch.eye(K)
    importance = torch.diagonal(H).clone()

    # 1. grids, per block, from the float weights
    scale, zero, shift = (torch.zeros(N, nb) for _ in range(3))
    for b in range(nb):
        cols = slice(b * block_size, min((b + 1) * block_size, K))
        scale[:, b], zero[:, b], shift[:, b] = searched_grid(W[:, cols], importance[cols],
                                                             bits, zero_point)
    # 2. order: largest inputs first (stable: ties keep their order)
    order = torch.sort(importance, descending=True, stable=True).indices
    W, H = W[:, order], H[order][:, order]
    U = _inverse_cholesky_upper(H)
    block = (order // block_size).tolist()  # each position's block

    # 3. columns, correcting the ones after
    codes = torch.zeros(N, K, dtype=torch.uint8)
    for c1 in range(0, K, COLUMNS_PER_UPDATE):
        c2 = min(c1 + COLUMNS_PER_UPDATE, K)
        W1, U1 = W[:, c1:c2].clone(), U[c1:c2, c1:c2]
        err = torch.zeros(N, c2 - c1)
        for i in range(c2 - c1):
            b = block[c1 + i]
            w = W1[:, i]
            code, q = round_to_grid(w, scale[:, b], zero[:, b], shift[:, b], bits)
            codes[:, order[c1 + i]] = code.to(torch.uint8)
            e = (w - q) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            err[:, i] = e
        W[:, c2:] -= err @ U[c1:c2, c2:]
    return _stored(codes, scale, zero, shift, bits, block_size, zero_point)


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` (in float64); more damping while H is not positive
    definite (calibration inputs that span fewer than K directions)."""
    extra = torch.diagonal(H).mean().item()
    for attempt in range(6):
        try:
            L = torch.linalg.cholesky(H.double())
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
        except torch.linalg.LinAlgError:
            H = H + 10.0 ** (attempt - 4) * extra * torch.eye(H.shape[0])
    raise ValueError("GPTQ: the calibration inputs' second moment is not positive definite")


def _stored(codes_NK: torch.Tensor, scale_Nb: torch.Tensor, zero_Nb: torch.Tensor,
            shift_Nb: torch.Tensor, bits: int, block_size: int,
            zero_point: str) -> QuantizedWeight:
    """MatMulNBits' storage of codes on per-block grids (``quant_math``'s layout); the
    padding past K gets each block's zero point (0 in the integer forms)."""
    N, K = codes_NK.shape
    nb = scale_Nb.shape[1]
    padded = zero_Nb.to(torch.uint8).repeat_interleave(block_size, 1)
    padded[:, :K] = codes_NK
    return QuantizedWeight(
        packed=pack(padded.reshape(N, nb, block_size), bits),
        scales=scale_Nb.reshape(-1).contiguous(),
        zero_points=pack(zero_Nb.to(torch.uint8), bits) if zero_point == "int" else None,
        K=K, N=N, bits=bits, block_size=block_size,
        block_offsets=shift_Nb.t().contiguous() if zero_point == "float" else None)
