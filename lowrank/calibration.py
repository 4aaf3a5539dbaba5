"""Calibration text → token windows → activation statistics of every target's input.

Statistics are kept per distinct layer input: modules that read the same tensor (q/k/v, or
gate/up) share one `ActivationStats`, so its Gram matrix is computed once.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .errors import CalibrationError
from .targets import Target
from .model_info import widths, without_cache

log = logging.getLogger(__name__)

#: Hugging Face data sets known by a short name: (path, config, split, text column).
KNOWN_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "wikitext2-test": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}

SAMPLE_TEXTS = ("hamlet", "macbeth", "tempest", "julius_caesar")


def sample_text_path(name: str = "hamlet") -> Path:
    """Path of a public-domain text shipped inside the package (see lowrank/data/texts)."""
    if name not in SAMPLE_TEXTS:
        raise CalibrationError(f"unknown sample text {name!r}; choose one of {', '.join(SAMPLE_TEXTS)}")
    return Path(str(resources.files("lowrank") / "data" / "texts" / f"{name}.txt"))


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise CalibrationError(f"{path} looks like a binary file, not text; pass a .txt file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8) and retry") from None


def _load_dataset_text(spec: str) -> str:
    """Text of a Hugging Face data set: a short name from KNOWN_DATASETS or hf:PATH[:CONFIG[:SPLIT]]."""
    if spec in KNOWN_DATASETS:
        path, config, split, column = KNOWN_DATASETS[spec]
    else:
        parts = spec.removeprefix("hf:").split(":")
        path = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 else "train"
        column = "text"
    try:
        import datasets
    except ImportError:
        raise CalibrationError(
            f"calibration source {spec!r} is a Hugging Face data set, which needs the datasets package: "
            "pip install 'lowrank[datasets]', or pass local .txt files"
        ) from None
    try:
        data = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # network errors come in many types
        raise CalibrationError(
            f"could not load data set {spec!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "check the name and your connection, or pass local .txt files"
        ) from None
    return "\n\n".join(row for row in data[column] if row)


def load_text(sources: list[str | Path] | str | Path | None) -> str:
    """Concatenated text from .txt files, folders of them, or data set names.

    With no sources, the bundled sample (Hamlet) is used, so the default run needs no arguments.
    """
    if sources is None or (isinstance(sources, (list, tuple)) and not sources):
        sources = [sample_text_path()]
    if isinstance(sources, (str, Path)):
        sources = [sources]
    pieces = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise CalibrationError(f"folder {path} holds no .txt files; put text files in it or pass files")
            pieces.extend(_read_text_file(p) for p in files)
        elif path.is_file():
            pieces.append(_read_text_file(path))
        elif str(source) in KNOWN_DATASETS or str(source).startswith("hf:"):
            pieces.append(_load_dataset_text(str(source)))
        else:
            raise CalibrationError(
                f"text source {str(source)!r} is not a file, a folder or a data set name; "
                f"pass .txt files, a folder, hf:PATH[:CONFIG[:SPLIT]] or one of {', '.join(KNOWN_DATASETS)}"
            )
    text = "\n\n".join(pieces)
    if not text.strip():
        raise CalibrationError("the text given is empty; pass files that contain text")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return ids


def token_windows(
    token_ids: torch.Tensor,
    n_samples: int | None,
    seq_len: int,
    seed: int = 0,
    what: str = "calibration",
) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens, chosen at random with `seed`.

    Non-overlapping when the text holds that many; otherwise random, possibly overlapping windows
    (as SVD-LLM draws them) and one warning. With `n_samples=None` every non-overlapping window is
    returned, in order (used for evaluation and training).
    """
    if seq_len < 2:
        raise CalibrationError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    if n_samples is not None and n_samples < 1:
        raise CalibrationError(f"--samples must be at least 1, got {n_samples}")
    n_tokens = token_ids.numel()
    if n_tokens < seq_len:
        raise CalibrationError(
            f"{what} text has {n_tokens} tokens, fewer than one window of {seq_len}; "
            "give more text or lower --seq-len"
        )
    available = n_tokens // seq_len
    windows = token_ids[: available * seq_len].view(available, seq_len)
    if n_samples is None:
        return windows
    generator = torch.Generator().manual_seed(seed)
    if n_samples > available:
        return _overlapping_windows(token_ids, n_samples, seq_len, generator, what)
    chosen = torch.randperm(available, generator=generator)[:n_samples].sort().values
    return windows[chosen]


def _overlapping_windows(
    token_ids: torch.Tensor, n_samples: int, seq_len: int, generator: torch.Generator, what: str
) -> torch.Tensor:
    """`n_samples` windows at random starts (overlaps allowed), with one warning saying how much text they cover."""
    n_tokens = token_ids.numel()
    starts = torch.randint(0, n_tokens - seq_len + 1, (n_samples,), generator=generator).sort().values
    covered = distinct_tokens_covered(starts, seq_len, n_tokens)
    log.warning(
        "%s text has %d tokens, enough for %d non-overlapping windows of %d but %d were requested; "
        "using %d overlapping windows, which cover %d distinct tokens (%.0f%% of the text); "
        "give more text for independent windows",
        what, n_tokens, n_tokens // seq_len, seq_len, n_samples, n_samples, covered, 100 * covered / n_tokens,
    )
    offsets = torch.arange(seq_len)
    return token_ids[starts[:, None] + offsets]


def distinct_tokens_covered(starts: torch.Tensor, seq_len: int, n_tokens: int) -> int:
    """How many token positions of the text at least one window [start, start + seq_len) covers."""
    covered = torch.zeros(n_tokens, dtype=torch.bool)
    for start in starts.tolist():
        covered[start : start + seq_len] = True
    return int(covered.sum())


# ---- calibration windows: one (n, seq_len) tensor, or a list of ready batches ------------------------

def window_batches(windows: "torch.Tensor | list[torch.Tensor]", batch_size: int) -> list[torch.Tensor]:
    """The forward-pass batches of `windows`: a (n, seq_len) tensor split `batch_size` rows at a time, or a
    list of (b, L) batches (an encoder's sentences, `lowrank.sentences`) taken as they are."""
    if isinstance(windows, torch.Tensor):
        return list(windows.split(batch_size)) if windows.shape[0] else []
    return list(windows)


def window_count(windows: "torch.Tensor | list[torch.Tensor]") -> int:
    """How many windows (rows: token sequences) the calibration holds."""
    return windows.shape[0] if isinstance(windows, torch.Tensor) else sum(b.shape[0] for b in windows)


def first_windows(windows: "torch.Tensor | list[torch.Tensor]", n: int) -> "torch.Tensor | list[torch.Tensor]":
    """The first `n` windows, in the same form (a list of batches is cut after its first `n` rows)."""
    if isinstance(windows, torch.Tensor):
        return windows[:n]
    kept, left = [], n
    for batch in windows:
        if left <= 0:
            break
        kept.append(batch[:left])
        left -= kept[-1].shape[0]
    return kept


def windows_after(windows: "torch.Tensor | list[torch.Tensor]", n: int) -> "torch.Tensor | list[torch.Tensor]":
    """Every window but the first `n`, in the same form: what `first_windows(windows, n)` leaves."""
    if isinstance(windows, torch.Tensor):
        return windows[n:]
    rest, skip = [], n
    for batch in windows:
        if skip < batch.shape[0]:
            rest.append(batch[skip:])
        skip = max(0, skip - batch.shape[0])
    return rest


#: Calibration windows the planner profiles (dense Grams, whitened spectra) before sequential compression,
#: which calibrates again on all of them, block by block on the compressed path (0: all of them). On
#: SmolLM2 (reports/speed-notes.md) 16 of 64 windows cut the profile's pass to a quarter, at +0.3%
#: perplexity at 0.8 but +2.9% at 0.6, so all is the default.
DEFAULT_PLAN_SAMPLES = 0


def planning_windows(windows: "torch.Tensor | list[torch.Tensor]", count: int) -> "torch.Tensor | list[torch.Tensor]":
    """The windows the planner profiles: the first `count` of a (n, seq_len) tensor (its rows are drawn at
    random), all when `count` is 0. An encoder's sentence batches are few, grouped by length, and all kept."""
    if count == 0 or not isinstance(windows, torch.Tensor):
        return windows
    return windows[:count]


#: Calibration windows the least-squares update of sequential compression fits on (0: all of them). A
#: subset saves the compressed block's extra pass on the other batches, and their kept layer inputs;
#: on SmolLM2 at 0.8, 32 of 64 windows cost 1.2% perplexity (reports/speed-notes.md), so all is the default.
DEFAULT_UPDATE_SAMPLES = 0


def leading_batches(windows: "torch.Tensor | list[torch.Tensor]", batch_size: int, count: int) -> int:
    """How many leading forward batches (`window_batches`) hold the first `count` windows of a (n, seq_len)
    tensor: all of them when `count` is 0, and for an encoder's sentence batches (few, grouped by length)."""
    total = len(window_batches(windows, batch_size))
    if count == 0 or not isinstance(windows, torch.Tensor):
        return total
    return min(total, -(-count // batch_size))


def leading_windows(windows: "torch.Tensor | list[torch.Tensor]", batch_size: int, count: int) -> int:
    """How many windows the `leading_batches` hold."""
    return sum(b.shape[0] for b in window_batches(windows, batch_size)[:leading_batches(windows, batch_size, count)])


def shortest_window(windows: "torch.Tensor | list[torch.Tensor]") -> int:
    """Tokens in the shortest window."""
    if isinstance(windows, torch.Tensor):
        return windows.shape[1]
    return min((b.shape[1] for b in windows), default=0)


def calibration_tokens(windows: "torch.Tensor | list[torch.Tensor]") -> int:
    """Token positions the calibration runs through the model: the rows of every input's statistics."""
    return windows.numel() if isinstance(windows, torch.Tensor) else sum(b.numel() for b in windows)


def thin_calibration(tokens: int, input_widths: dict[str, int]) -> str | None:
    """Why `tokens` calibration rows are too few for the layers with more inputs than that, or None.

    A Gram matrix summed from fewer rows than its width is singular: the whitened factors then fit only
    the input directions the calibration reached, and the ridge alone decides the others.
    """
    wider = {name: width for name, width in input_widths.items() if width > tokens}
    if not wider:
        return None
    widest = max(wider, key=wider.__getitem__)
    return (f"the calibration holds {tokens} tokens, fewer than the {wider[widest]} inputs of {widest} "
            f"({len(wider)} of {len(input_widths)} target layers have more inputs than that): their input statistics "
            "are singular and their factors fit only the directions the calibration reached; give at least "
            f"{wider[widest]} tokens, many times that for good factors (raise --samples or --seq-len, or give more "
            "text)")


def warn_if_thin(windows: "torch.Tensor | list[torch.Tensor]", targets: list[Target]) -> None:
    """Log `thin_calibration`'s warning for these windows and targets, if it has one."""
    message = thin_calibration(calibration_tokens(windows), {t.name: t.in_features for t in targets})
    if message is not None:
        log.warning(message)


#: Column width of the blocks in which `add_gram_` forms XᵀX (only blocks on or above the diagonal).
GRAM_BLOCK = 256


def add_gram_(gram: torch.Tensor, x: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """gram += XᵀX (float64 accumulator, products in x's dtype), computing only the upper block triangle.

    XᵀX is symmetric, so the blocks below the diagonal are copies: skipping them saves up to half the
    flops (a symmetric rank-k update, which torch does not expose). Each upper entry is the same dot
    product over the same rows as in the full x.T @ x, so on CPU the sums are the same bits (tested).
    """
    n = x.shape[1]
    if n <= block:
        gram += (x.T @ x).to(device=gram.device, dtype=torch.float64)
        return
    for start in range(0, n, block):
        stop = min(start + block, n)
        gram[start:stop, start:] += (x[:, start:stop].T @ x[:, start:]).to(device=gram.device, dtype=torch.float64)
        gram[stop:, start:stop] = gram[start:stop, stop:].T


@dataclass
class ActivationStats:
    """Running statistics of one layer input x ∈ R^n: Gram XᵀX (float64), count, Σ|x|."""

    dim: int
    gram: torch.Tensor = field(repr=False)
    abs_sum: torch.Tensor = field(repr=False)
    count: int = 0

    @classmethod
    def empty(cls, dim: int) -> "ActivationStats":
        return cls(dim, torch.zeros(dim, dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs of shape (..., n)."""
        flat = x.detach().reshape(-1, self.dim)
        # Per-batch products in float32 (float64 for float64 inputs), accumulated in float64.
        work = flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32)
        add_gram_(self.gram, work)
        self.abs_sum += work.abs().sum(0).to(device=self.abs_sum.device, dtype=torch.float64)
        self.count += flat.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


@dataclass
class OutputStats:
    """Running statistics of a bias-free layer y = W·x seen from its output: Σ y yᵀ (float64), count, Σ‖x‖².

    They give W·(G + λI)·Wᵀ = Σ y yᵀ + λ·W·Wᵀ, whose eigenvalues are the whitened spectrum σ(W·S)² and
    whose eigenvectors are its left directions (`factorize.output_side_spectrum`): an out × out sum
    where the input Gram G is in × in. For a layer much wider in than out that is not read alongside
    another (an MLP's down projection) this is what profiling collects (`output_side`).
    """

    dim: int  # out_features
    in_features: int
    gram: torch.Tensor = field(repr=False)
    energy: torch.Tensor = field(repr=False)  # Σ‖x‖², a 0-dim float64 tensor: the trace of the input Gram
    count: int = 0

    @classmethod
    def empty(cls, dim: int, in_features: int) -> "OutputStats":
        return cls(dim, in_features, torch.zeros(dim, dim, dtype=torch.float64), torch.zeros((), dtype=torch.float64))

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch of inputs (..., in) and their outputs (..., out)."""
        flat = y.detach().reshape(-1, self.dim)
        work = flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32)
        add_gram_(self.gram, work)
        inputs = x.detach().reshape(-1, self.in_features).to(work.dtype)
        self.energy += torch.linalg.vector_norm(inputs).to(device=self.energy.device, dtype=torch.float64) ** 2
        self.count += flat.shape[0]

    @property
    def damping_scale(self) -> float:
        """The mean eigenvalue of the input Gram (its trace over its width): what whitening's damping scales."""
        return float(self.energy) / self.in_features


def output_side(model: nn.Module, targets: list[Target]) -> set[str]:
    """The targets whose statistics are cheaper from their output (`OutputStats`): bias-free, narrower out
    than in, and reading something other than the residual stream (which q/k/v or gate/up read
    together, one input Gram for all). Which ones never changes a result, only its cost."""
    hidden, _ = widths(getattr(model, "config", None))
    return {t.name for t in targets
            if not t.has_bias and t.out_features < t.in_features and t.in_features != hidden}


class StatsCollector:
    """Forward pre-hooks that accumulate `ActivationStats` for a set of target modules.

    Targets that receive the very same input tensor object in a forward pass share one
    accumulation: the first hook to see a tensor updates the statistics, the others link to it.
    Targets named in `outputs` accumulate `OutputStats` instead (see `output_side`).
    """

    def __init__(self, model: nn.Module, targets: list[Target], outputs: set[str] = frozenset()):
        self.model = model
        self.targets = targets
        self.outputs = set(outputs)
        self.stats: dict[str, ActivationStats | OutputStats] = {}
        self._handles = []
        self._seen: dict[int, tuple[weakref.ref, ActivationStats]] = {}
        self._shares_input: set[str] = set()

    def _output_hook(self, target: Target):
        def hook(module, args, output):
            stats = self.stats.get(target.name)
            if stats is None:
                stats = self.stats[target.name] = OutputStats.empty(target.out_features, target.in_features)
            stats.update(args[0], output)

        return hook

    def _hook(self, name: str, dim: int):
        def hook(module, args):
            x = args[0]
            if name in self._shares_input:
                return  # another module already accumulated this very input
            entry = self._seen.get(id(x))
            if entry is not None and entry[0]() is x and name not in self.stats:
                self.stats[name] = entry[1]
                self._shares_input.add(name)
                return
            stats = self.stats.get(name)
            if stats is None:
                stats = self.stats[name] = ActivationStats.empty(dim)
            stats.update(x)
            self._seen[id(x)] = (weakref.ref(x), stats)

        return hook

    def __enter__(self) -> "StatsCollector":
        for target in self.targets:
            module = self.model.get_submodule(target.name)
            if target.name in self.outputs:
                self._handles.append(module.register_forward_hook(self._output_hook(target)))
            else:
                self._handles.append(module.register_forward_pre_hook(self._hook(target.name, target.in_features)))
        return self

    def end_batch(self) -> None:
        """Forget the tensors seen in the last forward pass."""
        self._seen.clear()

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()


def all_reduce_stats(stats: dict[str, ActivationStats | OutputStats], targets: list[Target],
                     outputs: set[str] = frozenset()) -> dict[str, ActivationStats | OutputStats]:
    """Every rank's statistics summed in float64 (shared inputs stay shared); `stats` itself with one process.
    `outputs`: the targets whose statistics are `OutputStats` (the collector's)."""
    if not distributed.active():
        return stats
    named = {name: [s.gram, s.energy if isinstance(s, OutputStats) else s.abs_sum,
                    torch.tensor(float(s.count), dtype=torch.float64)] for name, s in stats.items()}
    by_name = {t.name: t for t in targets}

    def zeros(name: str) -> list[torch.Tensor]:
        t = by_name[name]
        if name in outputs:
            return [torch.zeros(t.out_features, t.out_features), torch.zeros(()), torch.zeros(())]
        return [torch.zeros(t.in_features, t.in_features), torch.zeros(t.in_features), torch.zeros(())]

    summed = distributed.reduce_shared(named, [t.name for t in targets], zeros)
    merged: dict[int, ActivationStats | OutputStats] = {}
    for name, (gram, second, count) in summed.items():
        if id(gram) not in merged:
            t = by_name[name]
            merged[id(gram)] = OutputStats(t.out_features, t.in_features, gram, second, int(count)) \
                if name in outputs else ActivationStats(t.in_features, gram, second, int(count))
    return {name: merged[id(tensors[0])] for name, tensors in summed.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def statistics_runner(model: nn.Module, targets: list[Target]) -> nn.Module:
    """What to run for the targets' statistics: the backbone without its head (a causal LM's head over a
    49k vocabulary costs a quarter of the forward, and its logits are not used) when every target lies
    inside the backbone; the whole model otherwise. The targets see the very same inputs either way."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module) or backbone is model:
        return model
    if all(t.name.startswith(prefix + ".") for t in targets):
        return backbone
    return model


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    into: StatsCollector | None = None,
) -> dict[str, ActivationStats | OutputStats]:
    """Run the calibration windows through the model and return each target's input statistics.

    `into`: an open collector that already holds earlier windows' statistics (those of the sensitivity
    passes, `profiling.measure`); these windows add to them, and its `outputs` are collected so.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with StatsCollector(model, targets) if into is None else nullcontext(into) as collector:
            batches = distributed.my_share(window_batches(windows, batch_size))  # all of them with one process
            runner = statistics_runner(model, targets)
            for batch in tqdm(batches, desc="Calibrating", unit="batch", disable=not progress):
                runner(input_ids=batch.to(device), **without_cache(runner))
                collector.end_batch()
    finally:
        model.train(was_training)
    collector.stats = all_reduce_stats(collector.stats, targets, collector.outputs)
    missing = [t.name for t in targets if t.name not in collector.stats]
    if missing:
        raise CalibrationError(
            f"{len(missing)} target layers never ran during calibration (first: {missing[0]}); "
            "exclude them with --exclude"
        )
    return collector.stats


def text_windows(
    tokenizer,
    sources: list[str | Path] | str | Path | None,
    n_samples: int | None,
    seq_len: int,
    seed: int = 0,
    what: str = "calibration",
    default: str = "hamlet",
) -> torch.Tensor:
    """Token windows from text sources (the bundled `default` sample when none are given)."""
    if not sources:
        sources = [sample_text_path(default)]
    return token_windows(tokenize(tokenizer, load_text(sources)), n_samples, seq_len, seed, what)
