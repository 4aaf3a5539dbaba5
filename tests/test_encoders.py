"""Encoders: pooling, sentence agreement, the embedding Fisher, hidden-state recovery, `lowrank eval` on BERT."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import make_tiny_model, make_tiny_tokenizer, random_windows, run_cli, save_tiny_model
from lowrank.distill import hidden_state_loss
from lowrank.encoder_eval import agreement, compare_encoders, split_sentences
from lowrank.encoders import Pooling, embed, pool, pooling_of, read_pooling
from lowrank.errors import LowrankError
from lowrank.sensitivity import EMBEDDING_PROBES, measure_output_fisher
from lowrank.targets import find_targets


def test_mean_pooling_ignores_padding_and_normalize_gives_unit_vectors():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool(hidden, mask, Pooling("mean")), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(pool(hidden, mask, Pooling("cls")), torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(pool(hidden, mask, Pooling("max")), torch.tensor([[3.0, 4.0]]))
    unit = pool(hidden, mask, Pooling("mean", normalize=True))
    torch.testing.assert_close(unit, torch.tensor([[2.0, 3.0]]) / 13 ** 0.5)


def test_pooling_is_read_from_a_sentence_transformers_folder(tmp_path):
    assert read_pooling(tmp_path) is None
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pooling(tmp_path) == Pooling("cls", normalize=True)
    (tmp_path / "modules.json").write_text("{not json")
    with pytest.raises(LowrankError, match="modules.json"):
        read_pooling(tmp_path)


def test_split_sentences_keeps_sentences_of_four_words_or_more():
    text = "Exit.  Fair is foul, and foul is fair!\nHover through the fog and filthy air. What? Is this a dagger?"
    assert split_sentences(text) == ["Fair is foul, and foul is fair!", "Hover through the fog and filthy air.",
                                     "Is this a dagger?"]


def test_agreement_of_identical_and_of_swapped_embeddings():
    torch.manual_seed(0)
    reference = torch.randn(20, 8)
    same = agreement(reference * 3, reference)  # scale does not matter to a cosine
    assert same == pytest.approx({"mean_cosine": 1.0, "min_cosine": 1.0, "top1": 1.0, "recall_at_10": 1.0})
    swapped = reference.clone()
    swapped[[0, 1]] = reference[[1, 0]]  # sentences 0 and 1 now retrieve each other
    result = agreement(swapped, reference)
    assert result["top1"] == pytest.approx(18 / 20)
    cos01 = float(torch.nn.functional.cosine_similarity(reference[0], reference[1], dim=0))
    assert result["min_cosine"] == pytest.approx(cos01, abs=1e-6)
    assert result["mean_cosine"] == pytest.approx((18 + 2 * cos01) / 20, abs=1e-6)


def test_embedding_fisher_is_the_sum_of_probe_gradient_outer_products():
    """g = Jᵀr for each probe r at the pooled embedding; F = Σ g gᵀ over tokens and probes."""
    model = make_tiny_model("bert")
    targets = find_targets(model)
    windows = random_windows(4, 12)
    fisher = measure_output_fisher(model, targets, windows, batch_size=2, progress=False, seed=3)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())

    name = "bert.encoder.layer.0.attention.self.query"
    captured = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: captured.append(out))
    generator = torch.Generator().manual_seed(3)
    expected = torch.zeros(48, 48, dtype=torch.float64)
    for batch in windows.split(2):
        with torch.enable_grad():
            model.get_input_embeddings().weight.requires_grad_(True)
            embeddings = embed(model, batch, pooling=Pooling())
            output = captured.pop()
            for _ in range(EMBEDDING_PROBES):
                probe = torch.randn(embeddings.shape, generator=generator)
                (grad,) = torch.autograd.grad((embeddings * probe).sum(), output, retain_graph=True)
                flat = grad.reshape(-1, 48).double()
                expected += flat.T @ flat
    handle.remove()
    assert fisher[name].tokens == 4 * 12 * EMBEDDING_PROBES
    torch.testing.assert_close(fisher[name].matrix, expected, rtol=1e-4, atol=1e-10)


def test_the_mlm_objective_prices_a_masked_lm_and_the_next_token_one_refuses_it():
    model = make_tiny_model("bert")
    with pytest.raises(LowrankError, match="mask_token_id"):
        measure_output_fisher(model, find_targets(model), random_windows(2, 8), objective="mlm", progress=False)
    model.config.mask_token_id = 4
    fisher = measure_output_fisher(model, find_targets(model), random_windows(2, 8), objective="mlm", progress=False)
    assert all(float(torch.trace(f.matrix)) > 0 for f in fisher.values())
    with pytest.raises(LowrankError, match="causal language model"):
        measure_output_fisher(model, find_targets(model), random_windows(2, 8), objective="next-token",
                              progress=False)


def test_hidden_state_losses():
    torch.manual_seed(0)
    teacher = (torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    assert float(hidden_state_loss("cosine", teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    assert float(hidden_state_loss("mse", teacher, teacher)) == 0.0
    flipped = tuple(-t for t in teacher)
    assert float(hidden_state_loss("cosine", flipped, teacher)) == pytest.approx(2.0, abs=1e-6)
    assert float(hidden_state_loss("mse", flipped, teacher)) == pytest.approx(
        float(torch.stack([(4 * t ** 2).mean() for t in teacher]).mean()), rel=1e-6)


def test_compare_encoders_of_a_model_with_itself_and_with_a_perturbed_copy():
    model, tokenizer = make_tiny_model("bert"), make_tiny_tokenizer()
    assert compare_encoders(model, model, tokenizer, "Fair is foul, and foul is fair. Hover through the fog and "
                            "filthy air.", progress=False).mlm_perplexity is None  # no [MASK] token: no MLM perplexity
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    text = ("Fair is foul, and foul is fair. Hover through the fog and filthy air. When shall we three meet again? "
            "In thunder, lightning, or in rain? When the hurlyburly's done, when the battle's lost and won.")
    same = compare_encoders(model, model, tokenizer, text, progress=False)
    assert same.sentences == 5 and same.mean_cosine == pytest.approx(1.0) and same.top1 == 1.0
    assert same.mlm_perplexity == pytest.approx(same.reference_mlm_perplexity)
    other = make_tiny_model("bert", seed=1)
    different = compare_encoders(other, model, tokenizer, text, progress=False)
    assert different.mean_cosine < 0.99 and different.mlm_perplexity != same.mlm_perplexity
    assert pooling_of(model) == Pooling()


def test_eval_cli_compares_a_compressed_encoder_with_its_source(tmp_path, capsys):
    dense = tmp_path / "bert"
    save_tiny_model(dense, "bert")
    text = tmp_path / "eval.txt"
    text.write_text("Fair is foul, and foul is fair. Hover through the fog and filthy air. When shall we meet "
                    "again? In thunder, lightning, or in rain? When the battle's lost and won. " * 3)
    code, out, err = run_cli(capsys, "compress", str(dense), "-o", str(tmp_path / "c"), "--ratio", "0.9",
                             "--seq-len", "32", "--samples", "8", "--quiet")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "c"), "--text", str(text), "--json",
                             str(tmp_path / "r.json"), "--quiet")
    assert code == 0, err
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["sentences"] == 15 and 0.0 < record["mean_cosine"] < 1.0
    assert record["min_cosine"] <= record["mean_cosine"] and "embedding cosine mean" in out
    code, out, err = run_cli(capsys, "eval", str(dense), "--text", str(text))
    assert code == 1 and err.startswith("error: ") and "pass --against" in err


def test_the_minilm_recipe_runs_whole_on_a_tiny_bert(tmp_path, capsys, monkeypatch):
    """compress (embedding sensitivity, sentence calibration) → eval → recover (embedding cosine) → eval, on a tiny BERT."""
    from pathlib import Path

    from lowrank.training import ranks_of

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "minilm-l6.yaml"
    model = tmp_path / "tiny-bert"
    save_tiny_model(model, "bert")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "run", str(recipe), "--set", f"model={model}", "--set", "calibration.seq_len=32",
                             "--set", "recover.seq_len=32", "--set", "recover.steps=6", "--set", "recover.lr=0.001",
                             "--set", "recover.batch_size=2", "--set", "eval.max_sentences=40", "-q")
    assert code == 0, err
    before = json.loads((tmp_path / "minilm-r0.8-eval.json").read_text())
    after = json.loads((tmp_path / "minilm-r0.8-recovered-eval.json").read_text())
    assert before["sentences"] == after["sentences"] == 40
    # a random tiny BERT embeds every sentence alike, so its cosines say little; the real encoder's are in
    # tests/test_real_encoder.py. Here: the stages ran, on the same sentences, and training lowered its loss.
    assert 0 < before["min_cosine"] <= before["mean_cosine"] <= 1 + 1e-9
    history = [json.loads(line) for line in (tmp_path / "minilm-r0.8-recovered.train.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if h["event"] == "train"]
    # 1 − cosine lies in [0, 2] (up to float32 rounding: the random tiny BERT's embeddings nearly coincide)
    assert len(losses) == 6 and all(-1e-6 < loss < 2 for loss in losses)
    assert (tmp_path / "minilm-r0.8-recovered.loss.png").is_file()
    from lowrank.loading import load_model

    compressed, recovered = load_model("minilm-r0.8").model, load_model("minilm-r0.8-recovered").model
    assert ranks_of(compressed) == ranks_of(recovered)
    assert any(not torch.equal(a, b) for a, b in zip(compressed.parameters(), recovered.parameters()))
    assert sum(p.numel() for p in compressed.parameters()) == sum(p.numel() for p in recovered.parameters())


@pytest.mark.parametrize("loss,layers", [("cosine", "last"), ("mse", "all")])
def test_hidden_state_recovery_lowers_the_distance_to_the_teacher(loss, layers):
    """One fixed batch trained on repeatedly: its hidden-state loss must fall; ranks and sizes stay."""
    from lowrank.api import compress
    from lowrank.config import CompressConfig, RecoveryConfig
    from lowrank.training import batch_loss, ranks_of, recover

    teacher = make_tiny_model("bert", seed=1)  # a teacher far from the student, so there is something to learn
    student = make_tiny_model("bert")
    windows = random_windows(4, 16)
    compress(student, CompressConfig(ratio=0.6, strategy="uniform"), windows, progress=False)
    ranks, size = ranks_of(student), sum(p.numel() for p in student.parameters())
    config = RecoveryConfig(loss=loss, hidden_layers=layers, steps=15, lr=3e-3, batch_size=4, warmup=0,
                            checkpoint_every=0)
    with torch.no_grad():
        start = float(batch_loss(student, teacher, windows, config))
    result = recover(student, windows, config, teacher=teacher, progress=False)
    with torch.no_grad():
        end = float(batch_loss(student, teacher, windows, config))
    assert result.steps == 15 and end < 0.8 * start
    assert ranks_of(student) == ranks and sum(p.numel() for p in student.parameters()) == size


def test_the_embedding_loss_is_one_minus_the_cosine_of_pooled_embeddings_and_trains():
    from lowrank.compression import compress_model
    from lowrank.config import RecoveryConfig
    from lowrank.distill import embedding_loss
    from lowrank.training import batch_loss, recover

    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert float(embedding_loss(a, b)) == pytest.approx(0.5)  # cosines 1 and 0
    teacher = make_tiny_model("bert")
    student = make_tiny_model("bert", seed=1)  # far from the teacher: a loss well above rounding
    compress_model(student, ratio=0.5, windows=random_windows(8, 12), strategy="uniform", progress=False)
    windows = random_windows(16, 12, seed=1)
    config = RecoveryConfig(loss="embedding", steps=8, batch_size=4, seq_len=12, lr=1e-3, checkpoint_every=0)
    with torch.no_grad():  # values only: no graph (a float() of a graph's tensor warns)
        expected = 1 - torch.nn.functional.cosine_similarity(embed(student, windows[:4]),
                                                             embed(teacher, windows[:4])).mean()
        assert float(batch_loss(student, teacher, windows[:4], config)) == pytest.approx(float(expected), rel=1e-3)
        before = float(batch_loss(student, teacher, windows, config))
    recover(student, windows, config, teacher=teacher, progress=False)
    with torch.no_grad():
        assert float(batch_loss(student, teacher, windows, config)) < before


def test_an_encoder_student_trains_without_dropout():
    """Recovery with an encoder loss runs the student in eval mode: dropout would only add noise to distillation."""
    from lowrank.compression import compress_model
    from lowrank.config import RecoveryConfig
    from lowrank.training import recover

    teacher, student = make_tiny_model("bert"), make_tiny_model("bert")
    student.config.hidden_dropout_prob = 0.5
    compress_model(student, ratio=0.5, windows=random_windows(8, 12), strategy="uniform", progress=False)
    modes = []
    student.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    windows = random_windows(8, 12, seed=2)
    for loss in ("embedding", "cosine"):
        recover(student, windows, RecoveryConfig(loss=loss, steps=2, batch_size=4, seq_len=12, checkpoint_every=0),
                teacher=teacher, progress=False)
    assert modes and not any(modes)
    modes.clear()
    recover(student, windows, RecoveryConfig(loss="cosine", steps=1, batch_size=4, seq_len=12, checkpoint_every=0,
                                             gradient_checkpointing=True), teacher=teacher, progress=False)
    assert modes and all(modes)  # gradient checkpointing needs train mode


def test_encoder_recovery_trains_on_whole_sentences_batched_by_length(tmp_path, capsys):
    """`lowrank recover` of an encoder trains on the sentences of --data, one equal-length batch a step: each logged
    step's tokens are those of the batch `training_batch` picks (windows would give batch × seq-len every step)."""
    from lowrank.calibration import sample_text_path
    from lowrank.config import RecoveryConfig
    from lowrank.recovery import training_sentences
    from lowrank.sentences import split_sentences
    from lowrank.training import training_batch

    dense, compressed, recovered = tmp_path / "bert", tmp_path / "c", tmp_path / "r"
    save_tiny_model(dense, "bert")
    text = tmp_path / "train.txt"
    text.write_text(sample_text_path("macbeth").read_text(encoding="utf-8")[5000:8000])
    code, out, err = run_cli(capsys, "compress", dense, "-o", compressed, "--ratio", "0.8", "--seq-len", "32",
                             "--samples", "8", "-q")
    assert code == 0, err
    code, out, err = run_cli(capsys, "recover", compressed, "--data", text, "-o", recovered, "--loss", "embedding",
                             "--steps", "6", "--batch-size", "3", "--seq-len", "40", "--lr", "1e-3", "-q")
    assert code == 0, err
    log = [json.loads(line) for line in (tmp_path / "r.train.jsonl").read_text().splitlines()]
    seen = [entry["tokens"] for entry in log if entry["event"] == "train"]
    per_step = [b - a for a, b in zip([0] + seen, seen)]
    tokenizer = make_tiny_tokenizer()
    config = RecoveryConfig(loss="embedding", batch_size=3, seq_len=40)
    batches = training_sentences(tokenizer, [text], config)
    assert per_step == [training_batch(batches, step, 3, config.seed).numel() for step in range(6)]
    assert len(set(per_step)) > 1  # sentences of several lengths, not fixed windows
    sentences = split_sentences(text.read_text(encoding="utf-8"))
    whole = sorted(tuple(tokenizer(s, truncation=True, max_length=40).input_ids) for s in sentences)
    assert sorted(tuple(row) for batch in batches for row in batch.tolist()) == whole
    assert all(batch.shape[0] <= 3 for batch in batches)
