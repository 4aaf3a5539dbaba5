"""Does a compressed folder reload the way a user with accelerate loads it? (issue 13: "Reload")

    python benchmarks/check_reload.py OUT_FOLDER              # from_pretrained(OUT, device_map="auto", dtype=bf16)
    python benchmarks/check_reload.py OUT_FOLDER --compare    # and against the float32 reload: logit cosine

Loads `OUT_FOLDER` with `transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="auto",
dtype=torch.bfloat16)`, checks that every factored layer came back as a bf16 LowRankLinear and that
the logits of 2 random windows are finite; with --compare, that they agree with the float32 reload
(cosine > 0.999, as tests/test_streaming.py asks of a tiny model). Prints one JSON line; exits 1 when a
check fails.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (see bench_memory.py)

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--compare", action="store_true", help="also reload in float32 and compare the logits")
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()

    import transformers

    import lowrank  # noqa: F401  (registers the lowrank quantization config with transformers)
    from lowrank.layers import LowRankLinear

    plan = json.loads((args.folder / "lowrank_plan.json").read_text())
    factored = [name for name, module in plan["modules"].items() if module.get("rank") is not None]
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.folder, device_map="auto", dtype=torch.bfloat16)
    seconds = time.perf_counter() - started
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    windows = torch.randint(0, model.config.vocab_size, (2, args.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=windows.to(model.device)).logits.float().cpu()
    result = {"folder": str(args.folder), "load_seconds": round(seconds, 1), "low_rank_layers": len(layers),
              "factored_in_plan": len(factored),
              "all_bf16": all(p.dtype == torch.bfloat16 for m in layers.values() for p in m.parameters()),
              "finite_logits": bool(torch.isfinite(logits).all())}
    ok = result["low_rank_layers"] == len(factored) > 0 and result["all_bf16"] and result["finite_logits"]
    if args.compare:
        del model
        wide = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)
        with torch.no_grad():
            reference = wide(input_ids=windows).logits
        result["cosine_to_float32"] = round(float(torch.nn.functional.cosine_similarity(
            logits.flatten(), reference.flatten(), dim=0)), 6)
        ok = ok and result["cosine_to_float32"] > 0.999
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            result["peak_rss_bytes"] = int(line.split()[1]) * 1024
    result["ok"] = ok
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
