"""The `lowrank` command line: a thin layer over the Python API.

Every command's failures end in one line on stderr (`error: <problem>; <fix>`) and a non-zero
exit code, never a traceback (pass --debug to see one).
"""

from __future__ import annotations

import logging
import sys

import click

from .. import distributed
from ..errors import LowrankError
from .common import EXIT_ERROR, EXIT_INTERRUPTED, one_line


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lowrank")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors (for bug reports).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compress transformer checkpoints by low-rank factorization, and win back the accuracy."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _register_commands() -> None:
    """Add every `lowrank/cli/*_cmd.py` module's `command` to the group (one file per command)."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.endswith("_cmd"):
            cli.add_command(importlib.import_module(f"{__name__}.{info.name}").command)


_register_commands()


def _error(message: str, exc: BaseException) -> None:
    """Print one error line, unless another rank of a distributed run reports this failure."""
    if distributed.should_report(exc):
        click.echo(message.replace("error: ", distributed.origin(exc), 1) if distributed.active() else message, err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; maps every failure to a one-line message and exit code."""
    try:
        return _main(argv)
    finally:
        distributed.close()  # under torchrun: leave the process group before exiting


def _main(argv: list[str] | None = None) -> int:
    """Run one command; every failure becomes one line on stderr and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        result = cli.main(args=args, prog_name="lowrank", standalone_mode=False, obj={"argv": list(args)})
        return result if isinstance(result, int) else 0
    except click.exceptions.Abort as exc:  # click's form of Ctrl-C: the KeyboardInterrupt is its context
        _error(f"error: {getattr(exc.__context__, 'hint', 'interrupted; nothing was written and the input is untouched')}",
               exc)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as exc:  # a streamed run says where its finished blocks wait for --resume
        _error(f"error: {getattr(exc, 'hint', 'interrupted; nothing was written and the input is untouched')}", exc)
        return EXIT_INTERRUPTED
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        _error(f"error: {one_line(exc.format_message())}", exc)
        return exc.exit_code
    except LowrankError as exc:
        if debug:
            raise
        _error(f"error: {one_line(str(exc))}", exc)
        return EXIT_ERROR
    except MemoryError as exc:
        if debug:
            raise
        _error("error: out of memory; lower --samples, --seq-len or --batch-size, or use a bigger machine", exc)
        return EXIT_ERROR
    except OSError as exc:
        if debug:
            raise
        _error(f"error: {one_line(str(exc))}; check the paths and free disk space", exc)
        return EXIT_ERROR
    except Exception as exc:  # a bug: still one line, with the way to get details
        if debug:
            raise
        _error(f"error: unexpected {type(exc).__name__}: {one_line(str(exc))} (rerun with --debug for the traceback)", exc)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
