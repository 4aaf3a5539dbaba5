"""Zero-shot tasks through lm-evaluation-harness on a model in memory, offline, on a local task.

The task (tests/fixtures/lm_eval_choice) asks which of three continuations of a Hamlet line is the
true one; lm-eval's accuracy must equal the one computed here by hand from the model's log-probabilities.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_model, make_tiny_tokenizer, run_cli
from lowrank.compression import compress_model
from lowrank.config import EvalConfig
from lowrank.errors import LowrankError

FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval_choice"
TASK = "lowrank_tiny_choice"


@pytest.fixture
def task_folder(tmp_path, monkeypatch):
    """The local task, copied; lm-eval reads its relative data file from the working directory."""
    folder = shutil.copytree(FIXTURE, tmp_path / "task")
    monkeypatch.chdir(folder)
    return folder


def hand_accuracy(model, tokenizer, limit: int | None = None) -> float:
    """Accuracy by hand: the choice whose tokens (after the context and a space) have the highest log-likelihood."""
    docs = [json.loads(line) for line in (FIXTURE / f"{TASK}.jsonl").read_text().splitlines()][:limit]
    correct = 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(doc["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(float(log_probs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return correct / len(docs)


def test_lm_eval_accuracy_matches_a_hand_computation_dense_and_compressed(task_folder):
    pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install -e '.[eval]'")
    from lowrank.api import evaluate_tasks

    tokenizer = make_tiny_tokenizer()
    config = EvalConfig(tasks=[TASK], task_path=str(task_folder))
    dense = make_tiny_model("llama")
    compressed = make_tiny_model("llama")
    compress_model(compressed, ratio=0.3, method="svd", strategy="uniform", progress=False)
    accuracies = []
    for model in (dense, compressed):
        metrics = evaluate_tasks(model, config, tokenizer=tokenizer)[TASK]
        assert metrics["acc"] == pytest.approx(hand_accuracy(model, tokenizer), abs=1e-12)
        accuracies.append(metrics["acc"])
    assert all(0 <= a <= 1 for a in accuracies)


def test_eval_tasks_from_the_cli(task_folder, tiny_model_folder, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install -e '.[eval]'")
    from lowrank.loading import load_model

    code, stdout, stderr = run_cli(capsys, "eval", tiny_model_folder, "--tasks", TASK, "--task-path", task_folder,
                                   "--task-limit", "4", "--seq-len", "32", "--max-windows", "2", "--quiet",
                                   "--json", tmp_path / "tasks.json")
    assert code == 0, stderr
    record = json.loads((tmp_path / "tasks.json").read_text())
    assert set(record["tasks"]) == {TASK} and record["windows"] == 2
    assert f"{TASK}: acc " in stdout
    loaded = load_model(str(tiny_model_folder))
    assert record["tasks"][TASK]["acc"] == pytest.approx(hand_accuracy(loaded.model, loaded.tokenizer, limit=4),
                                                         abs=1e-12)


def test_unknown_task_is_one_line(task_folder, tiny_model_folder, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install -e '.[eval]'")
    code, _, stderr = run_cli(capsys, "eval", tiny_model_folder, "--tasks", "no_such_task", "--task-path",
                              task_folder, "--quiet")
    assert code != 0 and stderr.startswith("error: lm-eval knows no task no_such_task")
    assert len(stderr.strip().splitlines()) == 1


def test_missing_extra_is_one_line(tiny_model_folder, monkeypatch, capsys):
    """lm-eval made unimportable the way Python marks a missing module (sys.modules[name] = None)."""
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    code, _, stderr = run_cli(capsys, "eval", tiny_model_folder, "--tasks", "arc_easy", "--quiet")
    assert code != 0
    assert stderr.strip() == "error: --tasks needs lm-evaluation-harness, which is not installed; " \
                             "pip install 'lowrank[eval]'"
    with pytest.raises(LowrankError, match="lowrank\\[eval\\]"):
        from lowrank.lm_harness import require_lm_eval
        require_lm_eval()
