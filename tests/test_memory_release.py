"""What keeps a streamed run's peak down, piece by piece, with the numbers unchanged.

- whitening: the temporaries are freed early, and the bits equal the textbook formula on both paths;
- a sequential block's Grams are handed to their whitening, and each whitening is dropped after its
  last reader;
- the update's dense block shares the dense tensors instead of copying them;
- a BlockSource sends embeddings and head back to disk while only blocks run, and brings them back;
- the profile pass keeps the sensitivity windows' boundaries on disk.

(The loss gradient through the head, a slice of tokens at a time: tests/test_head_gradient.py.)
"""

from __future__ import annotations

import torch
import transformers
from helpers import CAUSAL_ARCHITECTURES, make_tiny_model, random_windows, save_tiny_model

from lowrank import factorize, stream_profile
from lowrank.block_source import BlockSource
from lowrank.boundary_store import BoundaryStore
from lowrank.calibration import ActivationStats
from lowrank.compression import _dense_copy
from lowrank.factorize import DEFAULT_DAMPING, WhiteningCache, whitening
from lowrank.layers import LowRankLinear, replace_module
from lowrank.model_info import count_parameters
from lowrank.profiling import targets_of
from lowrank.factorize import Factors


def _reference_whitening(gram: torch.Tensor, damping: float = DEFAULT_DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula as written before the memory work: (G + Gᵀ)/2, G + δ·s·I, Cholesky, else the eigh root."""
    gram = (gram + gram.T) / 2
    scale = torch.diagonal(gram).mean()
    identity = torch.eye(gram.shape[0], dtype=torch.float64)
    lower, info = torch.linalg.cholesky_ex(gram + damping * scale * identity)
    if int(info) == 0 and torch.isfinite(lower).all():
        inverse = torch.linalg.solve_triangular(lower, identity, upper=False)
        if torch.isfinite(inverse).all():
            return lower, inverse
    values, vectors = torch.linalg.eigh(gram)
    sqrt = (values.clamp(min=0.0) + damping * scale).sqrt()
    return (vectors * sqrt) @ vectors.T, (vectors / sqrt) @ vectors.T


def _grams(n: int = 96) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, n, generator=generator) * torch.rand(n, generator=generator)
    full = (x.T @ x).double()
    full[0, 1] += 1e-9  # not exactly symmetric, as accumulated Grams are not
    basis, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    values = torch.cat([torch.ones(5), torch.full((n - 5,), -1e-3)]).double()  # negative: Cholesky fails
    return {"cholesky": full, "eigh": basis @ torch.diag(values) @ basis.T}


def test_whitening_equals_the_textbook_formula_on_both_paths(monkeypatch):
    """Both paths run in place through SciPy's LAPACK (another build than torch's), so equal to rounding."""
    calls = []
    eigh = factorize.symmetric_eigh
    monkeypatch.setattr(factorize, "symmetric_eigh", lambda *a, **k: calls.append(1) or eigh(*a, **k))
    for path, gram in _grams().items():
        calls.clear()
        got = whitening(gram.clone())
        assert len(calls) == (1 if path == "eigh" else 0), path  # the path this Gram is meant to take
        root, inverse = _reference_whitening(gram)
        assert torch.allclose(got.root, root, rtol=0, atol=1e-12 * root.abs().max()), path
        assert torch.allclose(got.inverse, inverse, rtol=0, atol=1e-9 * inverse.abs().max()), path
        assert torch.allclose(got.root @ got.inverse, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-9), path


def test_a_whitening_holds_one_matrix_and_applies_s_and_its_inverse_through_it():
    generator = torch.Generator().manual_seed(1)
    for path, gram in _grams().items():
        white = whitening(gram.clone())
        held = [t for t in (white.lower, white.vectors) if t is not None]
        assert len(held) == 1 and held[0].shape == gram.shape, path  # S⁻¹ is never stored beside S
        root, inverse = _reference_whitening(gram)
        matrix = torch.randn(7, gram.shape[0], dtype=torch.float64, generator=generator)
        assert torch.allclose(white.whiten(matrix), matrix @ root, atol=1e-10 * (matrix @ root).abs().max()), path
        expected = matrix @ inverse
        assert torch.allclose(white.unwhiten(matrix), expected, atol=1e-8 * expected.abs().max()), path


def test_cholesky_in_place_works_inside_the_matrix_it_is_given_and_says_when_it_fails():
    matrix = _grams()["cholesky"]
    matrix = (matrix + matrix.T) / 2
    matrix.diagonal().add_(1e-3 * matrix.diagonal().mean())
    work = matrix.clone()
    lower = factorize.cholesky_in_place(work)
    assert lower.data_ptr() == work.data_ptr()  # L lives in the input's buffer
    assert torch.equal(lower, lower.tril())  # the upper triangle cleared
    assert torch.allclose(lower, torch.linalg.cholesky(matrix), rtol=0, atol=1e-12 * matrix.abs().max() ** 0.5)
    assert factorize.cholesky_in_place(-matrix.clone()) is None  # not positive definite


def test_symmetric_eigh_works_inside_the_matrix_it_is_given():
    """No copy of the input: its buffer is LAPACK's work matrix (half of eigh's peak on a 5632-wide input)."""
    matrix = _grams()["cholesky"]
    matrix = (matrix + matrix.T) / 2
    reference_values, reference_vectors = torch.linalg.eigh(matrix)
    work = matrix.clone()
    values, vectors = factorize.symmetric_eigh(work)
    assert not torch.equal(work, matrix)  # overwritten in place
    assert torch.allclose(values, reference_values, rtol=1e-12, atol=1e-9 * values.abs().max())
    assert torch.allclose(vectors.abs(), reference_vectors.abs(), atol=1e-8)  # equal up to each vector's sign
    assert torch.allclose((vectors * values) @ vectors.T, matrix, atol=1e-9 * matrix.abs().max())


def test_symmetrize_and_mirror_in_place_give_the_whole_matrix_formulas_bits():
    """Slab by slab, in the matrix's own buffer, with slabs that do not divide the width."""
    gram = _grams()["cholesky"]
    for slab in (7, 40, 512):
        work = gram.clone()
        factorize.symmetrize_in_place(work, slab=slab)
        assert torch.equal(work, (gram + gram.T) / 2), slab
        mirrored = gram.clone()
        factorize.mirror_lower_in_place(mirrored, slab=slab)
        lower = gram.tril(-1)
        assert torch.equal(mirrored, lower + lower.T + torch.diag(gram.diagonal())), slab


def _scipy_whitening(gram: torch.Tensor, damping: float = DEFAULT_DAMPING) -> tuple[str, torch.Tensor]:
    """The previous implementation's steps, each in its own new matrix: the bits a whitening must keep."""
    import scipy.linalg
    from scipy.linalg import lapack

    symmetric = (gram + gram.T) / 2
    scale = torch.diagonal(gram).mean()
    damped = symmetric.clone()
    damped.diagonal().add_(damping * scale)
    factor, info = lapack.dpotrf(damped.numpy().T.copy(order="F"), lower=1, clean=1)
    if int(info) == 0:
        return "lower", torch.from_numpy(factor)
    _, vectors = scipy.linalg.eigh(symmetric.numpy().T.copy(order="F"), check_finite=False, driver="evr")
    return "vectors", torch.from_numpy(vectors)


def test_a_consumed_gram_becomes_the_whitening_with_the_same_bits():
    """With `consume` the Gram's buffer is the only n × n matrix (Cholesky) and the result's bits do not move."""
    for path, gram in _grams().items():
        kind, expected = _scipy_whitening(gram)
        owned = gram.clone()
        white = whitening(owned, consume=True)
        got = white.lower if kind == "lower" else white.vectors
        assert got is not None, path
        assert torch.equal(got, expected), path
        if kind == "lower":
            assert got.data_ptr() == owned.data_ptr(), path  # L lives in the Gram's buffer
        kept = gram.clone()
        again = whitening(kept)  # not consumed: the caller's Gram is left as it was
        assert torch.equal(kept, gram), path
        assert torch.equal(again.lower if kind == "lower" else again.vectors, expected), path


def test_a_failed_cholesky_leaves_the_lower_triangle_it_did_not_read():
    matrix = -_grams()["cholesky"]  # not positive definite
    matrix = (matrix + matrix.T) / 2
    work = matrix.clone()
    assert factorize.cholesky_in_place(work) is None
    assert torch.equal(work.tril(-1), matrix.tril(-1))  # what `whitening` rebuilds the matrix from


def _stats(gram: torch.Tensor) -> ActivationStats:
    return ActivationStats(gram.shape[0], gram.clone(), torch.zeros(gram.shape[0], dtype=torch.float64), 1)


def test_whitening_cache_with_readers_frees_each_gram_and_drops_each_whitening_after_its_last_reader():
    grams = _grams()
    shared, single = _stats(grams["cholesky"]), _stats(grams["eigh"])
    cache = WhiteningCache(readers=[shared, shared, single])  # q and k read one input, down another
    buffer = shared.gram.data_ptr()
    first = cache.get(shared, "q")
    assert shared.gram is None  # handed to the whitening, freed there
    assert first.lower.data_ptr() == buffer  # and its buffer became the whitening's L
    assert torch.equal(first.root, whitening(grams["cholesky"]).root)
    cache.done(shared)
    assert cache.get(shared, "k") is first  # the second reader gets the same whitening, not a recomputed one
    cache.done(shared)
    assert id(shared) not in cache._by_input  # dropped after its last reader
    assert torch.equal(cache.get(single, "down").inverse, whitening(grams["eigh"]).inverse)
    plain = _stats(grams["cholesky"])
    WhiteningCache().get(plain)
    assert plain.gram is not None  # without readers (the one-shot path reuses its statistics), nothing is taken


def test_the_update_dense_block_shares_the_dense_tensors_and_keeps_them_when_the_block_is_factored():
    model = make_tiny_model("llama")
    block = model.model.layers[0]
    dense = _dense_copy(block)
    assert dense is not block and dense.mlp is not block.mlp
    assert all(a is b for a, b in zip(dense.parameters(), block.parameters()))  # no tensor copied
    before = block.mlp.down_proj.weight.detach().clone()
    factors = Factors(torch.randn(4, before.shape[1]), torch.randn(before.shape[0], 4))
    replace_module(block, "mlp.down_proj", LowRankLinear.from_factors(factors, bias=None))
    assert isinstance(block.mlp.down_proj, LowRankLinear)
    assert torch.equal(dense.mlp.down_proj.weight, before)  # the dense weight lives on in the copy


def _outside(source: BlockSource) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in source.model.named_parameters() if not n.startswith(source.prefix + ".")}


def test_block_source_sends_embeddings_and_head_to_disk_and_back(tmp_path):
    for tied in (False, True):
        config = make_tiny_model("llama").config
        config.tie_word_embeddings = tied
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / str(tied))
        source = BlockSource(tmp_path / str(tied))
        loaded, params = _outside(source), count_parameters(source.model)
        source.free_outside()
        assert all(p.is_meta for n, p in source.model.named_parameters() if n in loaded)
        assert count_parameters(source.model) == params  # tied weights stay one tensor on the meta device too
        source.load_outside()
        again = _outside(source)
        assert again.keys() == loaded.keys() and all(torch.equal(again[n], loaded[n]) for n in loaded)
        assert (source.model.lm_head.weight is source.model.model.embed_tokens.weight) == tied


def test_profile_pass_keeps_the_sensitivity_boundaries_on_disk(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "src", CAUSAL_ARCHITECTURES[0])
    stores = []

    class Recorded(BoundaryStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.most_held = 0
            stores.append(self)

        def put(self, *args):
            super().put(*args)
            self.most_held = max(self.most_held, self.held_bytes)

    monkeypatch.setattr(stream_profile, "BoundaryStore", Recorded)
    calibration = BoundaryStore()
    profile = stream_profile.profile_streamed(BlockSource(tmp_path / "src"), targets_of(model), random_windows(12, 24),
                                              calibration, progress=False)
    (levels,) = stores
    assert levels.spilled_bytes > 0 and levels.most_held == 0  # every level of the sensitivity windows on disk
    assert all(m.price is not None and torch.isfinite(m.price).all() for m in profile.matrices)


def test_all_finite_reads_slab_by_slab_and_finds_a_bad_entry_anywhere():
    matrix = torch.randn(700, 30, dtype=torch.float64)
    assert factorize.all_finite(matrix, entries=256)
    for row, bad in ((0, float("nan")), (699, float("inf")), (300, -float("inf"))):
        spoiled = matrix.clone()
        spoiled[row, 7] = bad
        assert not factorize.all_finite(spoiled, entries=256), (row, bad)
    assert not factorize.all_finite(torch.tensor([1.0, float("nan")]))


def test_a_transposed_or_strided_gram_gives_the_same_whitening():
    """Views that are not contiguous (a transposed Gram) are copied once, never misread by LAPACK."""
    for path, gram in _grams().items():
        expected = whitening(gram.clone())
        for view in (gram.clone().T, gram.clone().T.contiguous().T):
            got = whitening(view, consume=True)
            assert torch.allclose(got.root, expected.root, rtol=0, atol=1e-12 * expected.root.abs().max()), path
    matrix = _grams()["cholesky"]
    matrix = (matrix + matrix.T) / 2
    matrix.diagonal().add_(1e-3 * matrix.diagonal().mean())
    strided = torch.empty(matrix.shape[1], matrix.shape[0], dtype=torch.float64).T  # Fortran order
    strided.copy_(matrix)
    lower = factorize.cholesky_in_place(strided)
    assert torch.allclose(lower, torch.linalg.cholesky(matrix), rtol=0, atol=1e-12 * matrix.abs().max() ** 0.5)
