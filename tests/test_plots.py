"""The figures, drawn from a hand-made Profile whose spectra give known ranks and losses.

Two blocks, two layer types: q_proj (8×8) keeps 95% of its energy at rank 4 (σ = 1,1,1,1,0,…), up_proj
(16×8) at rank 1 (σ = 1,0,…); whitened, they need ranks 8 and 2. Each test catches the figure on its
way to disk (wrapping plots._save) and reads back its panels, titles, labels and plotted numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank import plots
from lowrank.errors import LowrankError
from lowrank.plan import ModulePlan
from lowrank.profile import MatrixProfile, Profile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Q, UP = "self_attn.q_proj", "mlp.up_proj"


def spectrum(*values: float) -> torch.Tensor:
    return torch.tensor(values + (0.0,) * (8 - len(values)), dtype=torch.float64)


def make_profile(whitened: bool) -> Profile:
    matrices = []
    for depth in (0, 1):
        matrices.append(MatrixProfile(f"model.layers.{depth}.{Q}", (8, 8), spectrum(1, 1, 1, 1),
                                      spectrum(*[1] * 8) if whitened else None))
        matrices.append(MatrixProfile(f"model.layers.{depth}.{UP}", (16, 8), spectrum(1),
                                      spectrum(1, 1) if whitened else None))
    return Profile(matrices, source="hand-made", whitened=whitened)


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every figure plots.py saves during the test, in order (they are still saved to their files)."""
    caught, save = [], plots._save

    def keep(fig, path):
        caught.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return caught


def panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def colorbar_labels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_rank_heatmap_holds_the_rank_fraction_for_95_percent_energy(figures, tmp_path):
    path = plots.plot_rank_heatmap(make_profile(whitened=True), tmp_path / "ranks.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    [fig] = figures
    weights, whitened = panels(fig)
    assert (weights.get_title(), whitened.get_title()) == ("weights W", "whitened W·S (output error)")
    np.testing.assert_allclose(weights.images[0].get_array(), [[4 / 8, 1 / 8], [4 / 8, 1 / 8]])  # depth × type
    np.testing.assert_allclose(whitened.images[0].get_array(), [[1.0, 2 / 8], [1.0, 2 / 8]])
    assert [t.get_text() for t in weights.get_xticklabels()] == ["q_proj", "up_proj"]
    assert [t.get_text() for t in weights.get_yticklabels()] == ["0", "1"]
    assert [t.get_text() for t in weights.texts] == [".50", ".12", ".50", ".12"]
    assert (weights.get_xlabel(), weights.get_ylabel()) == ("layer type", "block depth")
    assert colorbar_labels(fig) == ["rank / min(m, n) for 95% energy"]


def test_a_data_free_rank_heatmap_has_only_the_weights_panel(figures, tmp_path):
    plots.plot_rank_heatmap(make_profile(whitened=False), tmp_path / "ranks.png", level=0.5)
    [fig] = figures
    [weights] = panels(fig)
    np.testing.assert_allclose(weights.images[0].get_array(), [[2 / 8, 1 / 8], [2 / 8, 1 / 8]])
    assert colorbar_labels(fig) == ["rank / min(m, n) for 50% energy"]


def test_uniform_loss_curve_counts_parameters_kept_and_mean_loss():
    matrices = make_profile(whitened=False).matrices
    # ratio 0.5: q_proj rank 2 (32 of 64 kept, loss 2/4), up_proj rank 2 (48 of 128, loss 0)
    # ratio 1.0: q_proj rank 4 saves nothing, so it stays dense (64, loss 0); up_proj rank 5 (120 of 128)
    x, y = plots.uniform_loss_curve(matrices, False, np.array([0.5, 1.0]))
    np.testing.assert_allclose(x, [2 * (32 + 48) / 384, 2 * (64 + 120) / 384])
    np.testing.assert_allclose(y, [(0.5 + 0 + 0.5 + 0) / 4, 0.0])


def test_loss_against_parameters_has_a_curve_per_layer_type_and_one_for_all(figures, tmp_path):
    profile = make_profile(whitened=True)
    plots.plot_loss_vs_params(profile, tmp_path / "loss.png")
    [fig] = figures
    weights, whitened = panels(fig)
    assert weights.get_title() == "weights only: ‖W − W_k‖² / ‖W‖²"
    assert whitened.get_title() == "whitened: output error ‖(W − W_k)X‖² / ‖WX‖²"
    assert weights.get_xlabel() == "parameters kept (fraction of the dense target layers)"
    assert weights.get_ylabel() == "mean relative truncation loss (0 = exact)"
    for ax, is_whitened in ((weights, False), (whitened, True)):
        assert [line.get_label() for line in ax.lines] == [Q, UP, "all targets"]
        x, y = plots.uniform_loss_curve(profile.matrices, is_whitened, np.linspace(0.02, 1.0, 50))
        np.testing.assert_allclose(ax.lines[-1].get_xdata(), x)
        np.testing.assert_allclose(ax.lines[-1].get_ydata(), y)
    assert [t.get_text() for t in whitened.get_legend().get_texts()] == [Q, UP, "all targets"]


def test_spectra_have_a_panel_per_layer_type_and_a_curve_per_depth(figures, tmp_path):
    plots.plot_spectra(make_profile(whitened=False), tmp_path / "spectra.png", whitened=False, title="tiny spectra")
    [fig] = figures
    assert fig.get_suptitle() == "tiny spectra"
    q_panel, up_panel = panels(fig)
    assert (q_panel.get_title(), up_panel.get_title()) == (f"{Q} (8×8)", f"{UP} (16×8)")
    assert len(q_panel.lines) == len(up_panel.lines) == 2  # depths 0 and 1
    np.testing.assert_allclose(q_panel.lines[0].get_xdata(), np.arange(1, 9) / 8)
    np.testing.assert_allclose(q_panel.lines[0].get_ydata(), [1, 1, 1, 1, 1e-8, 1e-8, 1e-8, 1e-8])  # σᵢ/σ₁, floored
    assert q_panel.get_yscale() == "log" and q_panel.get_ylabel() == "σᵢ / σ₁ (log scale)"
    assert up_panel.get_xlabel() == "rank fraction i / min(m, n)"
    assert colorbar_labels(fig) == ["block depth (0 = first)"]


def test_whitened_spectra_need_calibration(tmp_path):
    with pytest.raises(LowrankError, match="has no whitened spectrum; analyze with calibration text"):
        plots.plot_spectra(make_profile(whitened=False), tmp_path / "s.png", whitened=True, title="t")


def test_plan_ranks_colour_the_parameters_kept_and_label_the_rank(figures, tmp_path):
    modules = {f"model.layers.0.{Q}": ModulePlan((8, 8), 2), f"model.layers.0.{UP}": ModulePlan((16, 8), None),
               f"model.layers.1.{Q}": ModulePlan((8, 8), 7), f"model.layers.1.{UP}": ModulePlan((16, 8), 3)}
    path = plots.plot_plan_ranks(modules, tmp_path / "plan.png", title="tiny plan")
    assert path.read_bytes()[:8] == PNG_MAGIC
    [fig] = figures
    [ax] = panels(fig)
    # rank 2 of 8×8 keeps 2·16/64; dense keeps all; rank 7 of 8×8 saves nothing (kept dense); rank 3 of 16×8: 72/128
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.5, 1.0], [1.0, 3 * 24 / 128]])
    assert [t.get_text() for t in ax.texts] == ["2", "D", "7", "3"]
    assert ax.get_title() == "tiny plan\n(cell label: rank; D = kept dense)"
    assert colorbar_labels(fig) == ["parameters kept / dense"]
