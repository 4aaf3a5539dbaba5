"""What a recovery run shows as it goes: a JSON-lines log of every step and evaluation, and a loss plot."""

from __future__ import annotations

import json
from pathlib import Path

from .fileio import atomic_write_text


class TrainingLog:
    """One JSON object per line and event (train step or eval), flushed as it happens."""

    def __init__(self, path: Path | None, keep_until_step: int = 0):
        self.path = Path(path) if path else None
        self.handle = None
        if self.path is None:
            return
        kept = []
        if keep_until_step > 0 and self.path.is_file():  # a resumed run drops what came after its checkpoint
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_until_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.handle:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle:
            self.handle.close()
            self.handle = None


def plot_history(history: list[dict], path: Path, title: str = "recovery") -> None:
    """Training loss per step and held-out perplexity per evaluation, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("event") == "train"]
    evals = [(r["step"], r["eval_ppl"]) for r in history if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), color="tab:blue", linewidth=1, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:red", label="held-out perplexity")
        ax2.set_ylabel("held-out perplexity")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
