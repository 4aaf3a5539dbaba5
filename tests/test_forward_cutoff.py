"""Ending a block's forward pass early (lowrank.forward_cutoff): what a pass reads stays, what follows is skipped."""

import pytest
import torch
from helpers import make_tiny_model, random_windows
from torch import nn

from lowrank.block_capture import BlockCall, capture_block_inputs, run_block
from lowrank.calibration import StatsCollector
from lowrank.compression import compress_sequential
from lowrank.forward_cutoff import ForwardCutoff
from lowrank.plan import ModulePlan, Plan
from lowrank.targets import find_targets

CPU = torch.device("cpu")


def counting(module: nn.Module) -> list:
    """A list that grows by one each time `module` computes its output."""
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def first_block(n_windows: int = 6, batch_size: int = 2):
    model = make_tiny_model("llama")
    captured = capture_block_inputs(model, random_windows(n_windows, 16), batch_size, CPU)
    return model, model.model.layers[0], captured.hidden, captured.calls[0]


def q_proj_gram(model, block, hidden, calls, cut: bool):
    """q_proj's input Gram over every batch, each batch run whole or cut after q_proj's input."""
    target = [t for t in find_targets(model) if t.name == "model.layers.0.self_attn.q_proj"]
    cutoff = ForwardCutoff([block.self_attn.q_proj] if cut else [], after="input")
    with StatsCollector(model, target) as collector, cutoff:
        outputs = [cutoff.run(block, h, call, CPU) for h, call in zip(hidden, calls)]
        collector.end_batch()
    return collector.stats["model.layers.0.self_attn.q_proj"].gram, outputs, cutoff


def test_a_cut_pass_reads_the_same_inputs_and_skips_what_follows():
    model, block, hidden, calls = first_block()
    mlp_runs = counting(block.mlp.down_proj)
    whole, whole_outputs, _ = q_proj_gram(model, block, hidden, calls, cut=False)
    assert len(mlp_runs) == 3
    cut, cut_outputs, cutoff = q_proj_gram(model, block, hidden, calls, cut=True)
    assert torch.equal(cut, whole)  # the same sums, bit for bit
    assert len(mlp_runs) == 3 + 1  # only the first batch reached the MLP
    assert cutoff.cut_batches == 2
    assert torch.equal(cut_outputs[0], whole_outputs[0]) and cut_outputs[1:] == [None, None]


def test_cut_after_the_output_still_computes_the_watched_module():
    model, block, hidden, calls = first_block()
    q_runs, o_runs = counting(block.self_attn.q_proj), counting(block.self_attn.o_proj)
    with ForwardCutoff([block.self_attn.q_proj], after="output") as cutoff:
        for h, call in zip(hidden, calls):
            cutoff.run(block, h, call, CPU)
    assert len(q_runs) == 3 and len(o_runs) == 1 and cutoff.cut_batches == 2


class _Reused(nn.Module):
    """A block that runs one module twice: cutting after its first call would lose the second."""

    def __init__(self):
        super().__init__()
        self.inner, self.after = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.after(self.inner(self.inner(x)))


def test_a_module_run_twice_or_never_disarms_the_cutoff():
    torch.manual_seed(0)
    block, call = _Reused(), BlockCall((), {}, hidden_by_keyword=False)
    batches = [torch.randn(2, 3, 4) for _ in range(3)]
    after_runs = counting(block.after)
    with ForwardCutoff([block.inner]) as cutoff:
        outputs = [cutoff.run(block, x, call, CPU) for x in batches]
    assert not cutoff.armed and cutoff.cut_batches == 0 and len(after_runs) == 3
    assert all(torch.equal(o, run_block(block, x, call, CPU)) for o, x in zip(outputs, batches))
    unused = nn.Linear(4, 4)  # never called by the block
    with ForwardCutoff([block.after, unused]) as cutoff:
        for x in batches:
            cutoff.run(block, x, call, CPU)
    assert not cutoff.armed and cutoff.cut_batches == 0


def test_an_unknown_cut_point_is_refused():
    with pytest.raises(ValueError, match="after must be one of"):
        ForwardCutoff([nn.Linear(2, 2)], after="middle")


def attention_only_plan(model) -> Plan:
    """q_proj and o_proj of every block at rank 6: nothing in the MLP is factored."""
    return Plan(modules={t.name: ModulePlan(t.shape, 6) for t in find_targets(model)
                         if t.name.endswith(("q_proj", "o_proj"))})


def test_sequential_compression_skips_the_mlp_in_its_reading_passes(monkeypatch):
    """Statistics and update each run the MLP for the first batch only; only carrying the activations on
    runs it for every batch. The factors are the same bits as with every pass run whole."""
    windows = random_windows(6, 16)  # 3 batches of 2
    model = make_tiny_model("llama")
    mlp_runs = [counting(layer.mlp.down_proj) for layer in model.model.layers]
    compress_sequential(model, attention_only_plan(model), windows, batch_size=2, update=True, progress=False)
    # block 0: statistics 1, update 1, carrying on 3; block 1 (the last): statistics 1, update 1
    assert [len(runs) for runs in mlp_runs] == [5, 2]

    whole = make_tiny_model("llama")
    monkeypatch.setattr(ForwardCutoff, "run", lambda self, block, h, call, device: run_block(block, h, call, device))
    compress_sequential(whole, attention_only_plan(whole), windows, batch_size=2, update=True, progress=False)
    got, expected = model.state_dict(), whole.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
