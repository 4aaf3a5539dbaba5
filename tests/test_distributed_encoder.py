"""An encoder's embedding-price pass on two gloo ranks: each rank prices its own share of the sentence batches,
the probes do not depend on the number of ranks, and the summed prices equal one process's.

The ranks are real processes started by torch.distributed.run; the test waits for them to exit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, make_tiny_model, random_windows
from test_distributed import GUARD_S, _env, products, relative

pytestmark = pytest.mark.usefixtures("one_thread")

#: 5 sentences of 12 tokens in batches of 2: 3 batches, so rank 0 prices two and rank 1 one.
SENTENCES, LENGTH, BATCH = 5, 12, 2


def price_tiny_bert() -> tuple[dict[str, torch.Tensor], int]:
    """The tiny BERT's embedding prices on SENTENCES random sentences (seeded bases), and its forward passes."""
    from lowrank.embedding_prices import DirectionBasis, measure_embedding_prices
    from lowrank.targets import find_targets

    model = make_tiny_model("bert")
    targets = find_targets(model)
    generator = torch.Generator().manual_seed(3)
    bases = {t.name: DirectionBasis(torch.randn(t.out_features, 4, generator=generator, dtype=torch.float64),
                                    torch.randn(t.in_features, 4, generator=generator, dtype=torch.float64))
             for t in targets}
    passes = []
    model.get_input_embeddings().register_forward_hook(lambda *args: passes.append(1))
    prices = measure_embedding_prices(model, targets, random_windows(SENTENCES, LENGTH), bases, batch_size=BATCH,
                                      progress=False)
    return prices, len(passes)


PRICES_ON_RANKS = r"""
import json, sys
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[2])
from lowrank import distributed
from test_distributed_encoder import price_tiny_bert

distributed.init_from_environment()
prices, passes = price_tiny_bert()
out = sys.argv[1]
with open(f"{out}/passes-{distributed.rank()}.json", "w") as handle:
    json.dump(passes, handle)
if distributed.rank() == 0:
    save_file({name: price.contiguous() for name, price in prices.items()}, f"{out}/prices.safetensors")
distributed.close()
"""


def test_embedding_prices_on_two_ranks_equal_one_process(tmp_path):
    from lowrank.targets import find_targets

    script = tmp_path / "prices.py"
    script.write_text(PRICES_ON_RANKS)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tmp_path), str(REPO / "tests")], env=_env(TMPDIR=str(tmp_path)),
                         capture_output=True, text=True, timeout=GUARD_S)  # torchrun's log folder: in tmp_path
    assert run.returncode == 0, run.stderr[-3000:]
    passes = [json.loads((tmp_path / f"passes-{r}.json").read_text()) for r in range(2)]

    one, one_passes = price_tiny_bert()
    targets = find_targets(make_tiny_model("bert"))
    per_batch = one_passes // 3
    assert passes == [2 * per_batch, per_batch], "each rank runs only its own batches (0 and 2; 1)"
    two = load_file(tmp_path / "prices.safetensors")
    assert one.keys() == two.keys() and len(one) == len(targets)
    for name in one:
        assert bool((one[name] > 0).all()), name
        assert relative(two[name], one[name]) < 1e-12, name


def test_encoder_compress_on_two_ranks_matches_one_process(tmp_path):
    """`compress --strategy sensitivity --nproc 2` on a tiny BERT (embedding prices split): same ranks and factors."""
    from helpers import save_tiny_model

    save_tiny_model(tmp_path / "bert", "bert")
    text = tmp_path / "calib.txt"
    text.write_text((REPO / "lowrank" / "data" / "texts" / "hamlet.txt").read_text(encoding="utf-8")[:20000])
    common = ["compress", str(tmp_path / "bert"), "--calib", str(text), "--samples", "8", "--seq-len", "16",
              "--batch-size", "2", "--ratio", "0.6", "--strategy", "sensitivity", "-q"]
    runs = [subprocess.run([sys.executable, "-m", "lowrank", *common, "-o", name, *extra], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=GUARD_S)
            for name, extra in (("one", []), ("two", ["--nproc", "2"]))]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    plans = [json.loads((tmp_path / name / "lowrank_plan.json").read_text()) for name in ("one", "two")]
    assert plans[0]["strategy"] == "sensitivity" and any(m["rank"] for m in plans[0]["modules"].values())
    assert {n: m["rank"] for n, m in plans[0]["modules"].items()} == \
        {n: m["rank"] for n, m in plans[1]["modules"].items()}
    a, b = products(tmp_path / "one"), products(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        assert relative(b[key], a[key]) < 1e-6, key
