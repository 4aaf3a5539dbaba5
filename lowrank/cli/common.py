"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

import functools
import json
import logging

import click
import torch

from ..config import CalibrationConfig, CompressConfig
from ..errors import LowrankError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


#: The configs' defaults, which every option shared by several commands takes as its own.
COMPRESS, CALIBRATION = CompressConfig(), CalibrationConfig()


def one_line(text: str) -> str:
    """Collapse a message to its first non-empty line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def _processes(ctx, param, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise LowrankError(f"--nproc {value!r} is not a number of processes; give a whole number of at least 1, "
                           "e.g. --nproc 2")
    return count


def nproc_option(func):
    """--nproc N: start torchrun (torch.distributed.run) with this command on N local processes."""
    return click.option("--nproc", callback=_processes, default=None, metavar="N",
                        help="Run on N local processes: starts torchrun with this same command, calibration split "
                             "across them (docs/distributed.md). Under torchrun or accelerate, leave it out.")(func)


def quiet_option(func):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars or summaries, only errors and results.")(func)


def model_options(func):
    """Options for loading a model: dtype, device, trust_remote_code, pickle, tokenizer."""
    decorators = [
        click.option("--dtype", type=click.Choice(list(DTYPES)), default=COMPRESS.dtype, show_default=True,
                     help="Precision the model is loaded and saved in (the factor math always runs in float64)."),
        click.option("--device", default=COMPRESS.device, show_default=True,
                     help="Where to run: auto (CUDA if available), cpu, cuda, cuda:1, ..."),
        click.option("--tokenizer", "tokenizer_source", default=None,
                     help="Folder or hub id of the tokenizer, when the model folder lacks one."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Allow model code from the checkpoint's repository to run (off: only transformers' own code)."),
        click.option("--allow-pickle", is_flag=True,
                     help="Accept pickle (.bin/.pt) weights, read with torch's weights_only mode. Off: safetensors only."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def text_options(default_help: str, flag: str = "--text"):
    """Options choosing token windows from text: files, seq-len, samples."""

    def wrap(func):
        return click.option(flag, "texts", multiple=True, metavar="PATH|DATASET",
                            help=f"Text: .txt files, folders of them, hf:PATH[:CONFIG[:SPLIT]] or wikitext2. {default_help}"
                            " Repeat for several.")(func)

    return wrap


def calibration_options(default_help: str = "Default: Hamlet, bundled with lowrank."):
    """--calib, --samples, --seq-len, --seed, --batch-size: the calibration windows and how they run."""
    decorators = [
        text_options(default_help, flag="--calib"),
        click.option("--samples", type=int, default=CALIBRATION.samples, show_default=True,
                     help="Calibration windows to draw at random."),
        click.option("--seq-len", type=int, default=CALIBRATION.seq_len, show_default=True,
                     help="Tokens per calibration window."),
        click.option("--seed", type=int, default=CALIBRATION.seed, show_default=True,
                     help="Seed for choosing the calibration windows."),
        click.option("--batch-size", type=int, default=COMPRESS.batch_size, show_default=True,
                     help="Calibration windows per forward pass."),
    ]

    def wrap(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return wrap


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def set_quiet_logging(quiet: bool) -> None:
    if quiet:
        logging.getLogger("transformers").setLevel(logging.ERROR)


def silence_transformers(func):
    """Keep transformers' own progress bars and advice out of our output."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # no "Retrying in 8s" lines when offline
        if kwargs.get("quiet"):
            transformers.utils.logging.disable_progress_bar()
        return func(*args, **kwargs)

    return wrapper
