"""Zero-shot tasks (ARC, PIQA, HellaSwag, WinoGrande, ...) on a model in memory, through lm-evaluation-harness.

lm-eval is the optional extra `lowrank[eval]`; the model is wrapped in lm-eval's own HFLM, so the
numbers are lm-eval's, computed on our LowRankLinear modules as they are (no dense merge).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from torch import nn

from .errors import LowrankError

#: The tasks the SVD-LLM, ASVD and Dobi-SVD papers report (lm-eval names; downloaded from the Hugging Face hub).
PAPER_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "openbookqa", "mathqa")
MISSING_EXTRA = "--tasks needs lm-evaluation-harness, which is not installed; pip install 'lowrank[eval]'"


def require_lm_eval() -> None:
    """A one-line LowrankError when lm-eval is not importable."""
    if importlib.util.find_spec("lm_eval") is None:
        raise LowrankError(MISSING_EXTRA)


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    task_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 4,
) -> dict[str, dict[str, float]]:
    """lm-eval's zero-shot metrics per task, e.g. {"arc_easy": {"acc": 0.61, "acc_norm": 0.55, ...}}.

    `task_path` is a folder of local task YAML files (lm-eval's include_path); `limit` keeps the first N examples.
    """
    if task_path is not None and not Path(task_path).is_dir():
        raise LowrankError(f"--task-path {task_path} is not a folder; give the folder holding the task YAML files")
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_path) if task_path is not None else None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise LowrankError(f"lm-eval knows no task {', '.join(unknown)}; check the names (`lm_eval ls tasks`) "
                           "or pass --task-path with the folder of your task YAML")
    device = str(next(model.parameters()).device)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    output = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), num_fewshot=0, limit=limit,
                                     task_manager=manager, log_samples=False, bootstrap_iters=0,
                                     random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    return {task: task_metrics(output["results"][task]) for task in tasks}


def task_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `{"acc,none": 0.6, "acc_stderr,none": "N/A", "alias": ...}` → `{"acc": 0.6}` (numbers only)."""
    metrics = {}
    for key, value in raw.items():
        name, _, _filter = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.endswith("_stderr") \
                and name != "sample_len":
            metrics[name] = float(value)
    return metrics
