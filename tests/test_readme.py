"""The README and docs/ say what is true: the README's Python code runs, and every link resolves.

The README's Python block is executed as written, in a temporary folder holding the files it names
(`my_texts/`, `train.txt`), with a tiny random Llama folder put in place of the real model and the
sizes (windows, tokens, steps) shrunk so that it takes seconds.

Cross-cutting (tests/ mirrors lowrank/ otherwise): the documentation, not a module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from helpers import VOCAB, run_cli, save_tiny_model

import lowrank
from lowrank.calibration import sample_text_path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 150

#: What the README's Python block names, and what the test puts in its place (each must occur).
SUBSTITUTIONS = {
    '"smollm2-135m"': None,  # the tiny model's folder, known only at run time
    "samples=64": "samples=8",
    "seq_len=512": "seq_len=32",
    "steps=50": "steps=3",
}


def python_blocks(markdown: str) -> list[str]:
    """The ```python fenced blocks, in order, each padded so that its line numbers are the README's."""
    return ["\n" * markdown.count("\n", 0, match.start(1)) + match.group(1)
            for match in re.finditer(r"^```python\n(.*?)^```$", markdown, flags=re.M | re.S)]


def shrink(code: str, model_folder: Path) -> str:
    """The README code with the tiny model and small sizes substituted; fails if a name has moved."""
    for old, new in SUBSTITUTIONS.items():
        assert old in code, f"the README's Python block no longer contains {old}; update SUBSTITUTIONS"
        code = code.replace(old, new if new is not None else repr(str(model_folder)))
    return code


def factor_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()
            if name.endswith((".down.weight", ".up.weight"))}


def test_readme_python_block_runs_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "the README has no ```python block"
    model_folder = tmp_path / "tiny-llama"
    save_tiny_model(model_folder)
    work = tmp_path / "work"
    (work / "my_texts").mkdir(parents=True)
    # Real text, shortened: the tiny tokenizer reads one character per token.
    (work / "my_texts" / "hamlet.txt").write_text(sample_text_path("hamlet").read_text(encoding="utf-8")[:6000],
                                                  encoding="utf-8")
    (work / "train.txt").write_text(sample_text_path("tempest").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    monkeypatch.chdir(work)
    inputs_before = {path: path.read_bytes() for path in model_folder.iterdir()}

    namespace: dict = {}
    for block in blocks:
        exec(compile(shrink(block, model_folder), str(README), "exec"), namespace)
    printed = capsys.readouterr().out

    plan, model = namespace["plan"], namespace["model"]
    assert isinstance(plan, lowrank.Plan)
    assert str(plan.summary()) in printed
    # The budget (ratio 0.8 of the target layers) is met and not wasted, and something was factored.
    assert 0.7 < plan.target_ratio <= 0.8
    assert plan.factored
    assert plan.source is not None and Path(plan.source).resolve() == model_folder.resolve()

    for folder in ("out", "out-rec"):
        code, out, err = run_cli(capsys, "verify", work / folder)
        assert code == 0, err
        assert "\nok: " in "\n" + out
    saved = json.loads((work / "out" / "lowrank_plan.json").read_text(encoding="utf-8"))["modules"]
    assert {name: entry["rank"] for name, entry in saved.items() if entry["rank"] is not None} == plan.factored

    # Recovery trained the factors but kept every rank.
    compressed = factor_tensors(lowrank.load("out"))
    recovered = factor_tensors(model)
    assert compressed.keys() == recovered.keys() and compressed
    assert all(compressed[name].shape == recovered[name].shape for name in compressed)
    assert any(not torch.equal(compressed[name], recovered[name]) for name in compressed)

    # The README's comment: transformers loads the same model wherever lowrank is installed.
    tokens = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    via_hf = transformers.AutoModelForCausalLM.from_pretrained("out-rec/").eval()
    with torch.no_grad():
        logits = model.eval()(tokens).logits
        assert torch.isfinite(logits).all()
        assert torch.equal(logits, via_hf(tokens).logits)

    assert {path: path.read_bytes() for path in model_folder.iterdir()} == inputs_before


def test_readme_is_under_150_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines; move details into docs/"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def without_fences(markdown: str) -> str:
    return re.sub(r"^```.*?^```$", "", markdown, flags=re.M | re.S)


def anchors(markdown: str) -> set[str]:
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", without_fences(markdown), flags=re.M)}


def strip_code(markdown: str) -> str:
    """Markdown without fenced blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", without_fences(markdown))


def relative_links(markdown: str) -> list[str]:
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", strip_code(markdown))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_docs_pages_exist_and_are_linked_from_the_readme():
    expected = {"cli", "concepts", "format", "results", "robustness", "architecture", "development"}
    assert expected <= {page.stem for page in DOC_PAGES}
    linked = {(README.parent / link.split("#")[0]).resolve() for link in relative_links(README.read_text())}
    unlinked = [page.name for page in DOC_PAGES if page.resolve() not in linked]
    assert not unlinked, f"docs pages not reachable from README.md: {unlinked}"


def test_every_relative_link_resolves():
    broken = []
    for page in [README, *DOC_PAGES]:
        text = page.read_text(encoding="utf-8")
        for link in relative_links(text):
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
