"""Shared test helpers: tiny random transformers built from configs, an offline tokenizer, the CLI.

Tests import these with `from helpers import ...` (pytest puts tests/ on sys.path); conftest.py
keeps only fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from hypothesis import HealthCheck, settings

VOCAB = 96


def _tiny_configs() -> dict:
    common = dict(vocab_size=VOCAB)
    return {
        "llama": transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, **common),
        "mistral": transformers.MistralConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, **common),
        "qwen2": transformers.Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, **common),
        "gpt2": transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=128, **common),
        "opt": transformers.OPTConfig(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                      word_embed_proj_dim=48, max_position_embeddings=128, **common),
        "bert": transformers.BertConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=128, **common),
    }


TINY_ARCHITECTURES = tuple(_tiny_configs())
CAUSAL_ARCHITECTURES = tuple(a for a in TINY_ARCHITECTURES if a != "bert")


def make_tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised model of architecture `arch`, in eval mode."""
    config = _tiny_configs()[arch]
    torch.manual_seed(seed)
    if arch == "bert":
        model = transformers.BertForMaskedLM(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def random_windows(n: int = 8, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq_len), generator=generator)


def smollm2_calibration(tokenizer) -> torch.Tensor:
    """The real-model tests' calibration: 16 windows of 128 tokens of the bundled Hamlet (seed 0).

    2048 tokens, more than SmolLM2's widest layer input (1536): every Gram matrix is full rank, as in a
    user's default run, and each whitening a Cholesky factor. With fewer, singular Grams fell back to
    eigendecompositions and the tests' compressions ran up to 2.5 times slower (54 against 22 s for the
    0.6 one of the recovery test); they now get Cholesky with a larger ridge first (`RIDGE_RETRIES`).
    """
    from lowrank.calibration import text_windows

    return text_windows(tokenizer, None, 16, 128, seed=0)


def make_tiny_tokenizer():
    """A character-level fast tokenizer (ids < VOCAB), built offline from the bundled Hamlet."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from lowrank.calibration import sample_text_path

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(set(sample_text_path("hamlet").read_text(encoding="utf-8"))):
        vocab.setdefault(char, len(vocab))
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def save_tiny_model(folder, arch: str = "llama", seed: int = 0):
    """Save a tiny model and the character tokenizer as a Hugging Face folder; return the model."""
    model = make_tiny_model(arch, seed)
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return model


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run `lowrank ARGS…` in-process; return the exit code, stdout and stderr."""
    from lowrank.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- a CLI process that waits for the test's Ctrl-C --------------------------------------------

#: `lowrank ARGS…` in a child process that stops at the first log record of lowrank matching
#: PATTERN: it prints "paused: MESSAGE" on stdout and waits there for the parent's SIGINT, so the
#: signal lands at a known point however slow or fast the machine is.
_PAUSING_CLI = r"""
import logging, re, sys, time
from lowrank.cli import main

pattern, argv = re.compile(sys.argv[1]), sys.argv[2:]

class PauseOnRecord(logging.Handler):
    def emit(self, record):
        if not pattern.search(record.getMessage()):
            return
        self.setLevel(logging.CRITICAL + 1)  # pause once
        print("paused:", record.getMessage(), flush=True)
        while True:
            time.sleep(0.01)  # the parent's SIGINT ends this wait with KeyboardInterrupt

stderr = logging.StreamHandler()  # the CLI's own stderr lines: warnings and errors only, as without this
stderr.setLevel(logging.WARNING)
stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
logging.getLogger().addHandler(stderr)
lowrank_log = logging.getLogger("lowrank")
lowrank_log.setLevel(logging.DEBUG)
lowrank_log.addHandler(PauseOnRecord())
sys.exit(main(argv))
"""


def start_cli_paused_at(pattern: str, *args, env: dict | None = None) -> subprocess.Popen:
    """Start `lowrank ARGS…` in a child process that pauses at the first lowrank log line matching `pattern`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", _PAUSING_CLI, pattern, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_paused(process: subprocess.Popen) -> str:
    """Block until the child announces its pause (or ends); return the announced log message."""
    line = process.stdout.readline()
    if not line.startswith("paused: "):
        out, err = process.communicate()
        raise AssertionError(f"the child ended without pausing (exit {process.returncode}): {line}{out}{err}")
    return line.removeprefix("paused: ").strip()


# ---- plans -----------------------------------------------------------------------------------------

#: Hypothesis settings of the fuzz tests (plans, budgets, ratios).
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_valid_plan(plan) -> None:
    """Everything later code relies on: sane shapes and ranks, typed fields, a JSON round trip."""
    from lowrank.plan import Plan

    assert isinstance(plan, Plan) and plan.modules
    for name, module in plan.modules.items():
        assert isinstance(name, str)
        out_features, in_features = module.shape
        for size in module.shape:
            assert type(size) is int and size > 0
        if module.rank is not None:
            assert type(module.rank) is int and 1 <= module.rank <= min(out_features, in_features)
    assert isinstance(plan.method, str) and isinstance(plan.strategy, str)
    assert isinstance(plan.budget, dict) and isinstance(plan.options, dict)
    assert plan.model_params is None or type(plan.model_params) is int
    summary = plan.summary()
    assert summary["modules"] == len(plan.modules) and summary["target_params_dense"] > 0
    text = json.dumps(plan.to_dict())
    again = Plan.from_dict(json.loads(text))
    assert again.modules == plan.modules and again.method == plan.method


# ---- fresh interpreters in temporary virtual environments (loading-safety tests) --------------------

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
PROBE = [[5, 17, 42, 8, 63, 21, 9, 30, 77, 12]]


def _site_dir(module) -> str:
    """The site-packages folder a module was imported from."""
    path = Path(module.__file__).resolve().parent
    return str(path.parent)


def make_env(root: Path, extra_modules: tuple = ()) -> Path:
    """A venv (no pip) whose sys.path holds torch's and transformers' folders but not this lowrank."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    dirs = dict.fromkeys(_site_dir(m) for m in (torch, transformers, *extra_modules))
    dirs = sorted(dirs, key=lambda d: sys.path.index(d) if d in sys.path else len(sys.path))  # this process's order
    Path(purelib, "_lowrank_test_deps.pth").write_text("\n".join(dirs) + "\n")
    return python


def run_in(python: Path, code: str, cwd: Path, **env_changes) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter, outside the checkout, with no PYTHONPATH."""
    env = clean_env()
    env.update(PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env_changes)
    return subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def clean_env() -> dict[str, str]:
    """This process's environment without PYTHONPATH (which may point at a checkout) or the hook switch."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOWRANK_AUTOLOAD")}


def pip_into(python: Path, *args: str) -> None:
    """Run pip for the environment of `python`."""
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args, "--quiet"], check=True,
                   capture_output=True, env=clean_env())


def hook_files(python: Path) -> list[str]:
    purelib = run_in(python, "import sysconfig; print(sysconfig.get_path('purelib'))", python.parent).stdout.strip()
    return sorted(p.name for p in Path(purelib).iterdir() if p.name.startswith(("lowrank-autoload", "lowrank_autoload")))


LOAD_AND_REPORT = """
import sys
assert not {"lowrank", "torch", "transformers"} & set(sys.modules), sorted(sys.modules)
import transformers
try:
    model = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, **KWARGS)
except Exception as exc:
    print("RAISED", type(exc).__name__, str(exc)[:200])
else:
    import torch
    from safetensors.torch import save_file
    with torch.no_grad():
        save_file({"logits": model(input_ids=torch.tensor(PROBE)).logits.contiguous()}, OUT)
    print("LOADED lowrank-imported:", "lowrank" in sys.modules)
"""


def load_script(folder: Path, out: Path, **kwargs) -> str:
    return f"FOLDER, OUT, PROBE, KWARGS = {str(folder)!r}, {str(out)!r}, {PROBE!r}, {kwargs!r}\n" + LOAD_AND_REPORT


# ---- a tiny GGUF file, written as llama.cpp would ---------------------------------------------

def tiny_gguf_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny random model whose widths suit GGUF's 32-wide quantization blocks (hidden 64, MLP 128)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "qwen3":  # transformers reads a Qwen3 GGUF with its default head_dim, 128
        common.update(num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "qwen3": transformers.Qwen3Config}[arch](**common)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def write_tiny_gguf(path, model: torch.nn.Module, gguf_arch: str = "llama", quantized: str | None = None) -> Path:
    """Write `model` as a GGUF file the way llama.cpp's converter does: its tensor names, query/key rows in the
    rotary order of llama.cpp for Llama, 2-D weights quantized to `quantized` (e.g. "Q8_0") if given."""
    import gguf
    import numpy as np

    config = model.config
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch), gguf.MODEL_ARCH.LLAMA)
    table = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        module, _, kind = name.rpartition(".")
        values = tensor.detach().float().numpy()
        if gguf_arch == "llama" and module.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
            values = values.reshape(heads, 2, values.shape[0] // heads // 2, *values.shape[1:])
            values = values.swapaxes(1, 2).reshape(tensor.shape)  # transformers' halves → llama.cpp's pairs
        values = np.ascontiguousarray(values)
        gguf_name = f"{table.get_name(module)}.{kind}"
        if quantized and values.ndim == 2:
            qtype = gguf.GGMLQuantizationType[quantized]
            writer.add_tensor(gguf_name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def hub_cache(cache_dir, repo_id: str, files_from, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay the files of folder `files_from` out as huggingface_hub caches a download of `repo_id` (refs/main →
    snapshots/COMMIT), so the real huggingface_hub code finds them offline; return the snapshot folder."""
    import shutil

    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_from, snapshot)
    return snapshot


def write_foreign_gguf(path, gguf_arch: str = "gpt2") -> Path:
    """A small valid GGUF file of architecture `gguf_arch` (one embedding tensor): for refusals by architecture."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def interrupt_compress_pass_at(monkeypatch, block: int = 1) -> list[int]:
    """Make a streamed run raise KeyboardInterrupt when its compress pass loads `block` (the block's third load:
    profile forward, profile backward, compress). Returns the list of block indices loaded so far."""
    from lowrank.block_source import BlockSource

    original, loads = BlockSource.load_block, []

    def load_then_stop(self, index):
        loads.append(index)
        if loads.count(block) == 3:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(BlockSource, "load_block", load_then_stop)
    return loads
