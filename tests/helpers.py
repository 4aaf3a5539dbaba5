"""Shared test helpers: tiny random transformers built from configs, an offline tokenizer, the CLI.

Tests import these with `from helpers import ...` (pytest puts tests/ on sys.path); conftest.py
keeps only fixtures.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import transformers

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
