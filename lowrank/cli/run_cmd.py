"""`lowrank run`: run a recipe (YAML: the model, the stage configs, the stages and their outputs)."""

from __future__ import annotations

import json

import click

from ..recipe import read_recipe, run_recipe
from .common import quiet_option, silence_transformers


@click.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, checked like the file: compress.ratio=0.6, model=FOLDER, "
                   "stages.0.output=FOLDER. Repeat for several.")
@click.option("--resume", is_flag=True, help="Skip every stage whose output exists and passes `lowrank verify` (a compressed or recovered "
                   "folder must also have been made with the same settings).")
@click.option("--dry-run", is_flag=True, help="Check the recipe and plan the compress stages: no factorization, "
                                              "nothing written.")
@click.option("--overwrite", is_flag=True, help="Replace stage outputs that exist.")
@quiet_option
@silence_transformers
def command(recipe, assignments, resume, dry_run, overwrite, quiet):
    """Run the stages of RECIPE (compress, recover, eval, report) in order.

    The resolved recipe, every default filled in, is written into each output
    (lowrank_recipe.yaml). See recipes/ for examples.
    """
    resolved = read_recipe(recipe, assignments)
    results = run_recipe(resolved, resume=resume, dry_run=dry_run, overwrite=overwrite, progress=not quiet,
                         echo=(lambda line: None) if quiet else click.echo)
    if quiet:
        click.echo(json.dumps(results))
