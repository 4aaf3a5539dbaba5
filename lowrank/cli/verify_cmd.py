"""`lowrank verify`: check a compressed folder's weight hashes and that its weights match its plan."""

from __future__ import annotations

import click

from ..errors import LowrankError
from ..verify import verify_folder


@click.command("verify")
@click.argument("folder", type=click.Path(file_okay=False, path_type=str))
def command(folder):
    """Check that compressed FOLDER is intact and consistent, without building the model.

    Every weight file must match the sha256 recorded in lowrank_plan.json, and the tensors
    must be what the plan says: down (k × in) and up (out × k) factors of the planned rank for
    every factored module, the full weight for every dense one, nothing else low-rank; and
    every tensor must be finite (no NaN or Inf).
    Also prints the folder's format version and whether transformers without lowrank refuses to
    load it ("protected"; format 1 folders are not).
    Prints "ok: ..." and exits 0 when sound; otherwise one line per problem and exit code 1.
    """
    result = verify_folder(folder)
    click.echo(f"format: {result.protection()}")
    if result.ok:
        click.echo(f"ok: {result.summary()}")
        return 0
    for problem in result.problems:
        click.echo(f"problem: {problem}")
    more = f" (and {len(result.problems) - 1} more, listed above)" if len(result.problems) > 1 else ""
    raise LowrankError(f"{folder} failed verification: {result.problems[0]}{more}; "
                       "restore the files or recompress the model")
