"""A Hugging Face Hub id as a local checkpoint: its safe files downloaded once (huggingface_hub), then read from disk.

Only the config, tokenizer and safetensors weights are fetched (`snapshot_download` with
`allow_patterns`), into the usual Hugging Face cache, where a second run (or an offline one, with
HF_HUB_OFFLINE=1) finds them. A repository whose weights exist only as pickles (.bin, .pt) is
refused: unpickling a stranger's file can run code.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from .errors import LowrankError

#: What a checkpoint needs, in safe formats: config, generation config, tokenizer, safetensors shards and index.
SAFE_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "vocab.*", "merges.txt"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class _SilentBar(tqdm):
    """A progress bar that never shows (`--quiet`)."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _first_line(exc: BaseException) -> str:
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (text[0] if text else type(exc).__name__)[:200]


def _remote_files(repo_id: str, revision: str | None, fallback: Path) -> list[str]:
    """The repository's file names: asked of the Hub, else (offline) what the cached snapshot holds."""
    from huggingface_hub import list_repo_files

    try:
        return list_repo_files(repo_id, revision=revision)
    except Exception:  # offline, or the Hub is down: judge from the cached files
        return [str(p.relative_to(fallback)) for p in fallback.rglob("*") if p.is_file()]


def download_checkpoint(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, progress: bool = True) -> Path:
    """The local snapshot folder of hub model `repo_id` (downloaded if not cached), holding safetensors weights."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=SAFE_FILES,
                                        local_files_only=local_files_only, **({} if progress else
                                                                              {"tqdm_class": _SilentBar})))
    except HFValidationError:
        raise LowrankError(f"{repo_id!r} is neither a local path nor a valid hub id (owner/name); check the "
                           "spelling") from None
    except GatedRepoError:
        raise LowrankError(f"hub model {repo_id} is gated; accept its licence on huggingface.co and log in "
                           "(huggingface-cli login), or pass a local folder") from None
    except RepositoryNotFoundError:
        raise LowrankError(f"hub model {repo_id} does not exist (or is private); check the id, or log in "
                           "(huggingface-cli login) if it is private") from None
    except RevisionNotFoundError:
        raise LowrankError(f"hub model {repo_id} has no revision {revision!r}; check the branch, tag or "
                           "commit") from None
    except LocalEntryNotFoundError:
        raise LowrankError(f"hub model {repo_id} is not in the local cache and the Hub cannot be reached (offline?); "
                           "connect and retry, or download it elsewhere and pass its folder") from None
    except OSError as exc:  # a full disk, an unwritable cache
        raise LowrankError(f"cannot download hub model {repo_id} ({_first_line(exc)}); set HF_HUB_CACHE to a "
                           "writable folder with room") from None
    if any(folder.glob("*.safetensors")):
        return folder
    remote = _remote_files(repo_id, revision, folder)
    if any(name.endswith(PICKLE_SUFFIXES) for name in remote):
        raise LowrankError(f"hub model {repo_id} has only pickle weights (.bin/.pt), which can run code when read; "
                           "use a repository with safetensors weights, or convert them where you trust the source")
    if any(name.endswith(".gguf") for name in remote):
        raise LowrankError(f"hub model {repo_id} holds GGUF files only; download the one you want "
                           f"(huggingface-cli download {repo_id} FILE.gguf) and pass that .gguf file")
    raise LowrankError(f"hub model {repo_id} has no safetensors weights; it is not a transformers checkpoint")
