"""Where SmolLM2-135M's residual stream keeps its energy: the first token's share and the top-3 channels' share.

Run:  python benchmarks/probe_residual_energy.py [windows] [blocks]   (default 4 windows, 12 blocks)

For each block's output over a few Hamlet calibration windows, prints the share of Σ‖h‖² held by
the first token of each window and by the three largest channels. This is why block refinement
measures each token's error relative to its own size (`--refine-loss token`): in a plain mean
squared error, these few tokens and channels decide the loss.
"""

from __future__ import annotations

import sys

import torch
from common import calibration_windows, load_smollm2

from lowrank.block_capture import capture_block_inputs, run_block
from lowrank.targets import find_block_list


@torch.no_grad()
def main() -> None:
    windows, blocks = (int(sys.argv[1]) if len(sys.argv) > 1 else 4), (int(sys.argv[2]) if len(sys.argv) > 2 else 12)
    loaded = load_smollm2()
    model = loaded.model
    captured = capture_block_inputs(model, calibration_windows(loaded.tokenizer, windows), windows, "cpu")
    hidden = captured.hidden
    for index, block in enumerate(find_block_list(model)[1][:blocks]):
        hidden = [run_block(block, h, call, torch.device("cpu")) for h, call in zip(hidden, captured.calls[index])]
        h = hidden[0].float()  # (windows, tokens, channels)
        per_token = h.pow(2).sum(-1)
        per_channel = h.pow(2).sum((0, 1))
        top = per_channel.topk(3)
        print(f"block {index}: first token {(per_token[:, 0].sum() / per_token.sum()).item():.3f} of the energy; "
              f"top-3 channels {top.indices.tolist()} {(top.values.sum() / per_channel.sum()).item():.3f}", flush=True)


if __name__ == "__main__":
    main()
