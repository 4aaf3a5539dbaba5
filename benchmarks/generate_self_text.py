"""Experiment (issue 17, stop 26): calibration text written by the dense model itself, prompted by Hamlet.

    python benchmarks/generate_self_text.py /tmp/smollm2-st -o /tmp/self64.txt
    lowrank compress /tmp/smollm2-st --ratio 0.6 --calib lowrank/data/texts/hamlet.txt --calib /tmp/self64.txt \
        --samples 128 -o DIR
    lowrank eval DIR --max-windows 40

Each of `--count` continuations starts from `--prompt-tokens` tokens of the prompt text (Hamlet, the
protocol's calibration text) at a seeded random place, and samples `--new-tokens` more from the dense
model (temperature 1, top-p 0.95, repetition penalty 1.2). Only the sampled tokens are written, one
continuation per paragraph: the text is the model's own distribution, so it widens calibration
without any text the evaluation could share (the data-free calibration of LLM-QAT). Not in the package:
it bought 4.8 % at 0.6, far less than three real texts (reports/refinement.md, stop 26).
"""

from __future__ import annotations

import lowrank  # noqa: F401  (first: it sets OPENBLAS_THREAD_TIMEOUT before SciPy starts its OpenBLAS)

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowrank.calibration import load_text, sample_text_path


def continuations(model, tokens: torch.Tensor, count: int, prompt_tokens: int, new_tokens: int, seed: int,
                  batch_size: int = 16) -> list[torch.Tensor]:
    """`count` sampled continuations of `new_tokens` tokens, each after `prompt_tokens` tokens of `tokens`."""
    generator = torch.Generator().manual_seed(seed)
    margin = min(2000, len(tokens) // 10)  # keep clear of the header and the footer
    starts = torch.randint(margin, len(tokens) - prompt_tokens - margin, (count,), generator=generator)
    torch.manual_seed(seed)
    out: list[torch.Tensor] = []
    began = time.time()
    for first in range(0, count, batch_size):
        prompts = torch.stack([tokens[s:s + prompt_tokens] for s in starts[first:first + batch_size].tolist()])
        with torch.no_grad():
            sampled = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                                     top_p=0.95, repetition_penalty=1.2, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id)
        out.extend(sampled[:, prompt_tokens:])
        print(f"{len(out)}/{count} continuations, {time.time() - began:.0f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder (safetensors) to sample from")
    parser.add_argument("--prompt-text", default=str(sample_text_path("hamlet")), help="where the prompts come from")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=544)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokens = tokenizer(load_text(args.prompt_text), return_tensors="pt").input_ids[0]
    pieces = continuations(model, tokens, args.count, args.prompt_tokens, args.new_tokens, args.seed)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n\n".join(tokenizer.decode(p, skip_special_tokens=True) for p in pieces))


if __name__ == "__main__":
    main()
