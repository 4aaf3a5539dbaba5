"""The math: pure functions from a weight W (out × in) and input statistics to low-rank factors.

Every method returns `Factors` with W ≈ up @ down, where down is (k × in) and up is (out × k).
Work happens in float64; callers cast the result to the model's dtype.

- `svd`:    truncated SVD of W; minimizes ‖W − W′‖_F, blind to the inputs.
- `asvd`:   SVD of W·diag(mean|x|^α), mapped back (Yuan et al., 2023).
- `whiten`: SVD of W·S with S Sᵀ = XᵀX, mapped back with S⁻¹ (SVD-LLM, Wang et al., ICLR 2025).
  It minimizes the output error ‖(W − W′)X‖_F, and each dropped σᵢ(W·S)² is exactly the
  squared output error that direction costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import LowrankError

METHODS = ("whiten", "asvd", "svd")

#: Ridge added to the Gram matrix, relative to its mean eigenvalue. It makes whitening well
#: defined for singular or badly conditioned Gram matrices at a negligible cost in output error.
DEFAULT_DAMPING = 1e-6

#: Larger ridges, as multiples of the damping, that `whitening` tries with Cholesky before it falls back to an
#: eigendecomposition. A Gram summed from fewer tokens than its width is singular, and its float32 products
#: leave eigenvalues just below zero (down to about −1e-5 × the mean eigenvalue on SmolLM2 at 512 tokens)
#: that a ridge of 1e-6 does not cover and one of 1e-5 or 1e-4 does. A Cholesky is n³/3 flops and the
#: eigendecomposition about ten times that (1.0 against 20 s for a 5632-wide Gram here).
RIDGE_RETRIES = (10.0, 100.0, 1000.0)

#: The largest ridge a retry may use, relative to the mean eigenvalue: beyond it the ridge would bias the
#: directions calibration did reach (the update's refit, whose own ridge is 1e-4, retries at 1e-3 only).
MAX_RETRY_RIDGE = 1e-3

#: Exponent of ASVD's activation scaling, the value recommended by its authors.
ASVD_ALPHA = 0.5


@dataclass
class Factors:
    """W ≈ up @ down: `down` maps inputs to the rank-k space, `up` maps it to the outputs."""

    down: torch.Tensor  # (k, in)
    up: torch.Tensor  # (out, k)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def matrix(self) -> torch.Tensor:
        """The rank-k approximation up @ down."""
        return self.up @ self.down


@dataclass
class Whitening:
    """A square root S of a (damped) Gram matrix G = S·Sᵀ, kept factored in one in × in matrix.

    Cholesky: S = L, lower triangular (`lower`). Eigendecomposition: the symmetric S = V·Λ^½·Vᵀ
    (`vectors` V and `scales` Λ^½). Neither S nor S⁻¹ is formed as a second matrix: W·S and M·S⁻¹ are
    computed through the factors (`whiten`, `unwhiten`), which halves a whitening's memory; a
    5632-wide MLP input's S and S⁻¹ in float64 are half a gigabyte.
    """

    lower: torch.Tensor | None = None  # L, (in, in)
    vectors: torch.Tensor | None = None  # V, (in, in)
    scales: torch.Tensor | None = None  # Λ^½, (in,)

    def whiten(self, matrix: torch.Tensor) -> torch.Tensor:
        """matrix · S."""
        if self.lower is not None:
            return matrix @ self.lower
        return ((matrix @ self.vectors) * self.scales) @ self.vectors.T

    def unwhiten(self, matrix: torch.Tensor) -> torch.Tensor:
        """matrix · S⁻¹ (a triangular solve, not a product with an inverse); S's pseudo-inverse where a scale
        is zero (a singular Gram whitened with no ridge: the directions calibration never reached map to 0)."""
        if self.lower is not None:
            return torch.linalg.solve_triangular(self.lower, matrix, upper=False, left=False)
        return _divide_or_zero(matrix @ self.vectors, self.scales) @ self.vectors.T

    @property
    def root(self) -> torch.Tensor:
        """S as a matrix (formed on each call)."""
        if self.lower is not None:
            return self.lower
        return (self.vectors * self.scales) @ self.vectors.T

    @property
    def inverse(self) -> torch.Tensor:
        """S⁻¹ as a matrix (formed on each call; the pseudo-inverse where a scale is zero, as in `unwhiten`)."""
        if self.lower is not None:
            identity = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
            return torch.linalg.solve_triangular(self.lower, identity, upper=False)
        return _divide_or_zero(self.vectors, self.scales) @ self.vectors.T


def _divide_or_zero(numerator: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """numerator / scales column by column, and 0 where a scale is 0 (the same bits elsewhere as the plain division,
    and no second matrix: the zeros are filled into the quotient)."""
    return (numerator / scales).masked_fill_(scales == 0, 0.0)


def all_finite(tensor: torch.Tensor, entries: int = 2**18) -> bool:
    """Whether every entry is finite, a few rows (about `entries` entries) at a time: `torch.isfinite` of a whole
    float64 matrix builds temporaries larger than the matrix (+334 MiB beside a 5632² Gram), and mid-sized ones
    stay in glibc's heap."""
    if tensor.dim() < 2:
        return bool(torch.isfinite(tensor).all())
    rows = max(1, entries // max(1, tensor[0].numel()))
    return all(bool(torch.isfinite(tensor[start:start + rows]).all()) for start in range(0, tensor.shape[0], rows))


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not all_finite(tensor):
        raise LowrankError(
            f"{what} contains NaN or Inf; check the model's weights and the calibration text"
        )


def cholesky_ridges(damping: float) -> list[float]:
    """The ridges, relative to the mean eigenvalue, that `whitening` tries Cholesky with, in order: δ, then its
    `RIDGE_RETRIES` multiples up to `MAX_RETRY_RIDGE` (none where δ is 0: no ridge was asked for)."""
    limit = MAX_RETRY_RIDGE * (1 + 1e-9)  # a product that rounds just above the limit still counts as on it
    return [damping, *(damping * factor for factor in RIDGE_RETRIES if 0 < damping * factor <= limit)]


def whitening(gram: torch.Tensor, damping: float = DEFAULT_DAMPING, name: str = "layer",
              consume: bool = False) -> Whitening:
    """A square root S of G + δ·mean(eig G)·I (see `Whitening`); never fails, never returns NaN.

    The fast path is a Cholesky factorization of the damped Gram matrix. Where rounding makes
    it fail (a matrix that is singular or has condition number 1e12 and beyond), it is retried
    with ridges 10, 100 and 1000 × δ, up to 1e-3 (`RIDGE_RETRIES`, `MAX_RETRY_RIDGE`; they differ
    from δ only in directions the calibration barely reached), and only then is the symmetric root from an
    eigendecomposition used, with negative eigenvalues clipped to zero and the ridge δ itself.
    With δ > 0 the ridge keeps every direction invertible; with δ = 0 (asked for), a singular Gram's
    unreached directions get zero scales and S⁻¹ is the pseudo-inverse. Memory: everything happens in one
    in × in float64 buffer, which becomes the result's (plus the eigenvectors on the fallback path):
    `gram`'s own with `consume` (the caller hands it over; `WhiteningCache` with readers does), else a copy.
    """
    work = gram.to(torch.float64)
    if work is gram and not consume:  # the caller keeps its Gram: work in a copy
        work = gram.clone(memory_format=torch.contiguous_format)
    work = work.contiguous()  # LAPACK works in place only in a contiguous buffer (no copy when it is one)
    del gram
    _check_finite(work, f"the Gram matrix of {name}")
    scale = torch.diagonal(work).mean()  # = mean eigenvalue (the diagonal of (G + Gᵀ)/2 is G's own)
    if scale <= 0:
        raise LowrankError(
            f"{name} received only zero inputs during calibration; "
            "use more or different calibration text, or exclude the layer with --exclude"
        )
    symmetrize_in_place(work)  # (G + Gᵀ)/2, the same bits as `(gram + gram.T) / 2`
    undamped = work.diagonal().clone()
    for attempt, ridge in enumerate(cholesky_ridges(damping)):
        if attempt:
            mirror_lower_in_place(work)  # (G + Gᵀ)/2 again, from the triangle the failed Cholesky did not touch
        work.diagonal().copy_(undamped).add_(ridge * scale)  # G + ridge·scale·I, no identity matrix beside it
        lower = cholesky_in_place(work)  # `work`'s buffer becomes L, or None with its strict lower triangle intact
        if lower is not None:
            return Whitening(lower=lower)
    mirror_lower_in_place(work)  # back to (G + Gᵀ)/2 from the triangle Cholesky did not touch
    work.diagonal().copy_(undamped)
    eigenvalues, vectors = symmetric_eigh(work)  # consumes `work`: its buffer becomes LAPACK's work matrix
    del work
    return Whitening(vectors=vectors, scales=(eigenvalues.clamp(min=0.0) + damping * scale).sqrt())


#: Rows per slab in the in-place symmetric copies below (only a slab's diagonal block is ever copied).
_SLAB = 256


def symmetrize_in_place(matrix: torch.Tensor, slab: int = _SLAB) -> None:
    """matrix ← (matrix + matrixᵀ)/2 without a second n × n matrix: each upper part is averaged in place with the
    lower part that mirrors it (the same additions as the whole-matrix formula, so the same bits), and only a
    slab's small diagonal block is copied."""
    n = matrix.shape[0]
    for start in range(0, n, slab):
        stop = min(start + slab, n)
        diagonal = matrix[start:stop, start:stop]
        diagonal.copy_((diagonal + diagonal.T) / 2)
        upper, lower = matrix[start:stop, stop:], matrix[stop:, start:stop].T  # disjoint: in place is safe
        upper.add_(lower).div_(2)
        lower.copy_(upper)


def mirror_lower_in_place(matrix: torch.Tensor, slab: int = _SLAB) -> None:
    """Copy the strict lower triangle onto the strict upper one (the diagonal is left as it is)."""
    n = matrix.shape[0]
    for start in range(0, n, slab):
        stop = min(start + slab, n)
        matrix[start:stop, stop:].copy_(matrix[stop:, start:stop].T)
        diagonal = matrix[start:stop, start:stop]
        diagonal.copy_(diagonal.tril() + diagonal.tril(-1).T)


def cholesky_in_place(matrix: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor L of the symmetric positive definite float64 `matrix`, computed in its
    buffer (LAPACK's dpotrf through SciPy on CPU: no second n × n matrix), or None where it fails.

    Only the diagonal and the upper triangle are read and overwritten: where it fails, the strict lower
    triangle still holds the input's (what `whitening` rebuilds the matrix from).
    """
    if matrix.device.type != "cpu":
        lower, info = torch.linalg.cholesky_ex(matrix)  # a new matrix: `matrix` is left intact
        if int(info) != 0 or not torch.isfinite(lower).all() or not bool((lower.diagonal() > 0).all()):
            return None
        matrix.copy_(lower)
        return matrix
    from scipy.linalg import lapack

    # the transpose is the same symmetric matrix in Fortran order, so LAPACK works in its buffer: its lower
    # triangle is `matrix`'s upper one, and its untouched strict upper triangle is `matrix`'s strict lower one
    array = matrix.numpy().T
    factor, info = lapack.dpotrf(array, lower=1, clean=0, overwrite_a=1)
    if factor.ctypes.data != array.ctypes.data:  # LAPACK worked on a copy (`matrix` not contiguous): bring it back
        array[...] = factor
    # `matrix` now holds Lᵀ in its upper triangle, and the (finite) input below it: this checks L alone
    if int(info) != 0 or not all_finite(matrix) or not bool((matrix.diagonal() > 0).all()):
        return None
    return matrix.triu_().T  # clear the input's strict lower triangle (in the contiguous buffer: no copy)


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric float64 `matrix`, which it may overwrite.

    On CPU, LAPACK's MRRR driver (dsyevr, through SciPy) works inside `matrix` with O(n) extra space:
    two n × n matrices at the peak, where torch.linalg.eigh's divide and conquer (dsyevd) holds four.
    For the 5632-wide MLP input of a 1B-class model that is half a gigabyte.
    """
    if matrix.device.type != "cpu":
        return torch.linalg.eigh(matrix)
    import scipy.linalg

    # the transpose is the same symmetric matrix in Fortran order, so LAPACK works in its buffer, not a copy
    values, vectors = scipy.linalg.eigh(matrix.numpy().T, overwrite_a=True, check_finite=False, driver="evr")
    return torch.from_numpy(values), torch.from_numpy(vectors)


class WhiteningCache:
    """One whitening per distinct layer input: modules that read the same input (q/k/v, gate/up) share
    one statistics object (see `calibration.StatsCollector`), so they share one whitening too.

    With `readers` (each module's statistics object, one entry per module that will ask), a Gram
    matrix is handed to its whitening and freed there, and a whitening is dropped after its last
    reader's `done`: memory holds one input's whitening at a time where inputs are read in order.
    """

    def __init__(self, damping: float = DEFAULT_DAMPING, readers: list | None = None):
        self.damping = damping
        self._by_input: dict[int, tuple[object, Whitening]] = {}
        self._left: dict[int, int] | None = None
        if readers is not None:
            self._left = {}
            for stats in readers:
                self._left[id(stats)] = self._left.get(id(stats), 0) + 1

    def get(self, stats, name: str = "layer") -> Whitening:
        """The whitening of `stats.gram`, computed on first use (`name` labels its errors)."""
        entry = self._by_input.get(id(stats))
        if entry is None or entry[0] is not stats:
            gram, taken = self._gram(stats)
            entry = (stats, whitening(gram, self.damping, name, consume=taken))
            del gram
            self._by_input[id(stats)] = entry
        return entry[1]

    def _gram(self, stats) -> tuple[torch.Tensor, bool]:
        """`stats.gram`, and whether the whitening may work in it: with readers it is taken from `stats`, so that
        the whitening holds the only reference and its buffer becomes the whitening's."""
        gram = stats.gram
        taken = self._left is not None and id(stats) in self._left
        if taken:
            stats.gram = None
        return gram, taken

    def done(self, stats) -> None:
        """One reader of `stats` is finished; after the last (with readers), its whitening is dropped."""
        if self._left is None or id(stats) not in self._left:
            return
        self._left[id(stats)] -= 1
        if self._left[id(stats)] <= 0:
            self._by_input.pop(id(stats), None)


def top_singular(product: torch.Tensor, k: int | None = None, right: bool = True,
                 left: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The k leading singular triplets (U_k, σ_k, V_kᵀ) of a float64 matrix A, σ descending (k=None: all).

    From a symmetric eigensolve of the smaller Gram matrix (A Aᵀ or Aᵀ A), where LAPACK's SVD of A
    costs 2–3× more on these shapes; the other side's vectors follow as Aᵀ U / σ or A V / σ. σ² is
    exact to about max(m, n)·ε·σ₁², as in `gram_svdvals`: directions below that are returned with
    σ = 0 and a zero vector on the divided side (callers that need them exactly fall back to an SVD).
    `right=False` (`left=False`): V_kᵀ (U_k) is not wanted, and comes back None where it would cost a product.
    """
    m, n = product.shape
    k = min(m, n) if k is None else min(k, m, n)
    wide = m <= n
    sigma, vectors = _leading_roots(product @ product.T if wide else product.T @ product, k, max(m, n))
    inverse = reciprocal_or_zero(sigma)
    if wide:
        return vectors, sigma, (vectors.T @ product) * inverse[:, None] if right else None
    return (product @ vectors) * inverse if left else None, sigma, vectors.T


def reciprocal_or_zero(sigma: torch.Tensor) -> torch.Tensor:
    """1/σ where σ > 0, and 0 where σ is 0 (a direction lost to rounding: its vector is divided to zero)."""
    return torch.where(sigma > 0, 1.0 / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), torch.zeros_like(sigma))


def _leading_roots(gram: torch.Tensor, k: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest σ = √eigenvalue of the symmetric `gram` = A·Aᵀ, descending, and their eigenvectors; σ² at or
    below `size` (A's larger side) × ε × σ₁², rounding, is returned as 0."""
    squares, vectors = torch.linalg.eigh(gram)
    squares, vectors = squares.flip(0)[:k], vectors.flip(1)[:, :k]
    floor = size * torch.finfo(squares.dtype).eps * squares[:1].clamp_min(0.0)
    return torch.where(squares > floor, squares, torch.zeros_like(squares)).sqrt(), vectors


def output_side_spectrum(weight: torch.Tensor, stats, damping: float = DEFAULT_DAMPING,
                         name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """The left directions U and the values σ of the whitened W·S from a layer's `OutputStats`, without its input
    Gram: (W·S)(W·S)ᵀ = W·(G + λI)·Wᵀ = Σ y yᵀ + λ·W·Wᵀ, with λ = `damping` × the mean eigenvalue of G, as
    `whitening` damps it. The same U and σ as `top_singular(whitening(G).whiten(W))`, up to rounding."""
    w = weight.to(torch.float64)
    outputs = stats.gram.to(torch.float64)
    _check_finite(outputs, f"the output Gram matrix of {name}")
    scale = stats.damping_scale
    if not scale > 0:
        raise LowrankError(
            f"{name} received only zero inputs during calibration; "
            "use more or different calibration text, or exclude the layer with --exclude"
        )
    product = (outputs + outputs.T) / 2 + (damping * scale) * (w @ w.T)
    sigma, left = _leading_roots(product, min(w.shape), max(w.shape))
    return left, sigma


def _truncate(product: torch.Tensor, k: int, back: "Callable[[torch.Tensor], torch.Tensor] | None") -> Factors:
    """Rank-k factors of `product` = W·S, mapped back to W's input space by `back` (M ↦ M·S⁻¹).

    The singular values are split evenly between the factors (√σ each), which keeps both on
    the same scale: better conditioned for storage in low precision and for fine-tuning.
    """
    k = max(1, min(k, *product.shape))
    u, s, vh = top_singular(product, k)
    if s[-1] <= 0:  # directions lost to the Gram's rounding: only a full SVD resolves them
        u, s, vh = torch.linalg.svd(product, full_matrices=False)
    del product  # freed before the map back, where the caller passed its only reference
    root_s = s[:k].sqrt()
    up = u[:, :k] * root_s
    down = root_s[:, None] * vh[:k]
    if back is not None:
        down = back(down)
    return Factors(down=down, up=up)


def svd_factors(weight: torch.Tensor, rank: int) -> Factors:
    """Plain truncated SVD: the best rank-k approximation in Frobenius norm."""
    weight = weight.to(torch.float64)
    _check_finite(weight, "the weight")
    return _truncate(weight, rank, None)


def asvd_factors(weight: torch.Tensor, mean_abs: torch.Tensor, rank: int, alpha: float = ASVD_ALPHA) -> Factors:
    """ASVD: scale input channel j by (mean |x_j|)^α before the SVD, undo it after."""
    weight = weight.to(torch.float64)
    _check_finite(weight, "the weight")
    scale = mean_abs.to(torch.float64).clamp(min=1e-8) ** alpha
    _check_finite(scale, "the activation scale")
    product = weight * scale[None, :]
    return _truncate(product, rank, lambda down: down / scale[None, :])


def whiten_factors(
    weight: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    damping: float = DEFAULT_DAMPING,
    name: str = "layer",
    white: Whitening | None = None,
) -> Factors:
    """Truncation-aware whitening (SVD-LLM): truncate the SVD of W·S, map back with S⁻¹.

    Pass a precomputed `white` to share one whitening between modules that read the same input.
    """
    _check_finite(weight, f"the weight of {name}")
    if white is None:
        white = whitening(gram, damping, name)
    # no names held here: the float64 copy of W is freed once W·S exists, and W·S once `_truncate` has its SVD
    return _truncate(white.whiten(weight.to(torch.float64)), rank, white.unwhiten)


def gram_svdvals(stack: torch.Tensor) -> torch.Tensor:
    """σ of each float64 matrix in `stack` (…, m, n), descending: √eigvalsh of the smaller Gram matrix.

    Why not svdvals: a Householder bidiagonalization costs ~4mn² and is memory-bound, while the
    Gram product is one BLAS-3 call and a min(m, n)² eigensolve is cheap. The price is absolute
    accuracy: σᵢ² is exact to about ε·σ₁² (ε = 2.2e-16). Energy, truncation loss and stable rank
    are sums of σ², so they keep that precision; σᵢ² below max(m, n)·ε·σ₁², where the Gram
    cannot tell them from rounding, are reported as 0 (the rule numpy's matrix_rank uses for σ).
    """
    m, n = stack.shape[-2:]
    gram = stack @ stack.mT if m <= n else stack.mT @ stack
    squares = torch.linalg.eigvalsh(gram).flip(-1)
    floor = max(m, n) * torch.finfo(squares.dtype).eps * squares[..., :1].clamp_min(0.0)
    return torch.where(squares > floor, squares, torch.zeros_like(squares)).sqrt()


def whitened_singular_values(weight: torch.Tensor, gram: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """σᵢ(W·S): σᵢ² is the squared output error of dropping direction i."""
    white = whitening(gram, damping)
    return gram_svdvals(white.whiten(weight.to(torch.float64)))


def factorize(
    method: str,
    weight: torch.Tensor,
    rank: int,
    gram: torch.Tensor | None = None,
    mean_abs: torch.Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
    name: str = "layer",
    white: Whitening | None = None,
) -> Factors:
    """Dispatch to one of `METHODS`; `gram` (or `white`) is needed by whiten, `mean_abs` by asvd."""
    if method == "svd":
        return svd_factors(weight, rank)
    if method == "asvd":
        if mean_abs is None:
            raise LowrankError("method asvd needs calibration statistics; pass --calib text")
        return asvd_factors(weight, mean_abs, rank)
    if method == "whiten":
        if gram is None and white is None:
            raise LowrankError("method whiten needs calibration statistics; pass --calib text")
        return whiten_factors(weight, gram, rank, damping, name, white)
    raise LowrankError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W − W′)X‖²_F computed from the Gram matrix: trace(D G Dᵀ) with D = W − W′."""
    diff = weight.to(torch.float64) - approx.to(torch.float64)
    return float(((diff @ gram.to(torch.float64)) * diff).sum())
