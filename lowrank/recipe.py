"""Recipes: a YAML file holding a model, the stage configs and a list of stages, run by `lowrank run`.

    model: smollm2-135m
    compress: {ratio: 0.6}            # CompressConfig fields
    calibration: {samples: 64}        # CalibrationConfig fields
    recover: {steps: 50}              # RecoveryConfig fields
    eval: {max_windows: 40}           # EvalConfig fields (eval and report stages)
    stages:
      - {stage: compress, output: out}
      - {stage: recover, data: [bundled:tempest], output: out-recovered}
      - {stage: report, output: out-recovered-report}

A stage reads `input` (default: the model for compress, else the last compressed or recovered
folder). Texts may name a bundled play as `bundled:NAME`. Unknown keys and wrong types are
one-line errors naming the key and the valid choices; `--set key=value` overrides are checked
the same way. The resolved recipe, defaults filled in, is written into every output.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import api
from .calibration import SAMPLE_TEXTS, sample_text_path
from .fileio import atomic_write_text
from .config import CONFIG_CLASSES, CalibrationConfig, CompressConfig, EvalConfig, RecoveryConfig, read_config_record
from .encoder_eval import EncoderAgreement
from .errors import LowrankError
from .verify import verify_folder

RECIPE_VERSION = 1
#: The resolved recipe, as written into every output folder.
RECIPE_FILE = "lowrank_recipe.yaml"
STAGES = ("compress", "recover", "eval", "report")
TOP_KEYS = ("version", "description", "model", *CONFIG_CLASSES, "stages")
#: The keys each kind of stage takes (beyond `stage`).
STAGE_KEYS = {
    "compress": ("output", "input"),
    "recover": ("output", "input", "data"),
    "eval": ("output", "input"),
    "report": ("output", "input", "source", "before", "perplexity"),
}


@dataclass
class Stage:
    """One step of a recipe: what it runs, what it reads and where it writes."""

    kind: str
    output: str
    input: str | None = None
    data: list[str] = field(default_factory=list)   # recover: training text
    source: str | None = None                        # report: the dense model for "perplexity before"
    before: bool = True                              # report: measure the source model too
    perplexity: bool = True                          # report: measure perplexity at all (not for encoders yet)

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"stage": self.kind, "input": self.input, "output": self.output}
        if self.kind == "recover":
            record["data"] = list(self.data)
        if self.kind == "report":
            record.update({"source": self.source, "before": self.before, "perplexity": self.perplexity})
        return record


@dataclass
class Recipe:
    """A validated recipe: the model, one config per stage kind, and the stages in order."""

    model: str
    compress: CompressConfig
    calibration: CalibrationConfig
    recover: RecoveryConfig
    eval: EvalConfig
    stages: list[Stage]
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe: every default filled in, every input named."""
        return {"version": RECIPE_VERSION, "description": self.description, "model": self.model,
                "compress": self.compress.to_dict(), "calibration": self.calibration.to_dict(),
                "recover": self.recover.to_dict(), "eval": self.eval.to_dict(),
                "stages": [s.to_dict() for s in self.stages]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---- reading and checking -------------------------------------------------------------------------

def _expect(value: Any, kind: type | tuple, where: str, expected: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise LowrankError(f"{where} must be {expected}, got {value!r}")
    return value


def _text_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    _expect(value, list, where, "a list of paths or data sets")
    for item in value:
        _expect(item, str, where, "a list of paths or data sets")
    return list(value)


def _stage(entry: Any, index: int, previous: str | None, model: str) -> Stage:
    where = f"stages[{index}]"
    _expect(entry, dict, where, "a mapping such as {stage: compress, output: FOLDER}")
    kind = entry.get("stage")
    if kind not in STAGES:
        raise LowrankError(f"{where}.stage must be one of {', '.join(STAGES)}, got {kind!r}")
    valid = ("stage", *STAGE_KEYS[kind])
    for key in entry:
        if key not in valid:
            raise LowrankError(f"unknown key {where}.{key} for a {kind} stage; valid keys: {', '.join(valid)}")
    if "output" not in entry:
        raise LowrankError(f"{where} ({kind}) has no output; add output: PATH")
    output = _expect(entry["output"], str, f"{where}.output", "a path")
    default_input = model if kind == "compress" else previous
    stage_input = _expect(entry.get("input", default_input), (str, type(None)), f"{where}.input", "a path")
    if stage_input is None:
        raise LowrankError(f"{where} ({kind}) has no input: no compress or recover stage comes before it; "
                           "add input: FOLDER")
    stage = Stage(kind, output, stage_input)
    if kind == "recover":
        if "data" not in entry:
            raise LowrankError(f"{where} (recover) has no data; add data: [TRAINING_TEXT, ...]")
        stage.data = _text_list(entry["data"], f"{where}.data")
    if kind == "report":
        stage.source = _expect(entry.get("source"), (str, type(None)), f"{where}.source", "a model name or path")
        stage.before = _expect(entry.get("before", True), bool, f"{where}.before", "true or false")
        stage.perplexity = _expect(entry.get("perplexity", True), bool, f"{where}.perplexity", "true or false")
    return stage


def recipe_from_dict(data: Any) -> Recipe:
    """Validate a recipe's plain data (from YAML) and fill in every default."""
    _expect(data, dict, "the recipe", f"a mapping with keys {', '.join(TOP_KEYS)}")
    for key in data:
        if key not in TOP_KEYS:
            raise LowrankError(f"unknown key {key} in the recipe; valid keys: {', '.join(TOP_KEYS)}")
    version = data.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise LowrankError(f"recipe version {version!r} is not supported; write version: {RECIPE_VERSION}")
    if "model" not in data:
        raise LowrankError("the recipe names no model; add model: NAME_OR_PATH")
    model = _expect(data["model"], str, "model", "a model name or path")
    description = _expect(data.get("description"), (str, type(None)), "description", "a string")
    configs = {name: cls.from_dict(data.get(name) or {}, where=name) for name, cls in CONFIG_CLASSES.items()}
    stages_data = data.get("stages")
    if not isinstance(stages_data, list) or not stages_data:
        raise LowrankError(f"stages must be a non-empty list of {{stage: {'|'.join(STAGES)}, output: PATH}}, "
                           f"got {stages_data!r}")
    stages, previous = [], None
    for index, entry in enumerate(stages_data):
        stage = _stage(entry, index, previous, model)
        if stage.kind in ("compress", "recover"):
            previous = stage.output
        stages.append(stage)
    outputs = [s.output for s in stages]
    duplicated = sorted({o for o in outputs if outputs.count(o) > 1})
    if duplicated:
        raise LowrankError(f"two stages write {duplicated[0]}; give every stage its own output")
    return Recipe(model=model, description=description, stages=stages, **configs)


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """`compress.ratio=0.6` → (['compress', 'ratio'], 0.6); the value is read as YAML (numbers, lists, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise LowrankError(f"--set {text!r} is not KEY=VALUE; write e.g. --set compress.ratio=0.6")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(data: dict, assignments: list[str]) -> dict:
    """A copy of the recipe data with each `--set KEY=VALUE` applied (checked later with the rest)."""
    data = copy.deepcopy(data)
    for text in assignments:
        path, value = parse_assignment(text)
        node: Any = data
        for depth, key in enumerate(path[:-1]):
            where = ".".join(path[:depth + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise LowrankError(f"--set {text}: {where} is not a stage; stages run from 0 to {len(node) - 1}")
                node = node[int(key)]
                continue
            if key not in node and depth == 0 and key in CONFIG_CLASSES:
                node[key] = {}
            if key not in node or not isinstance(node[key], (dict, list)):
                valid = ", ".join(TOP_KEYS if depth == 0 else node)
                raise LowrankError(f"--set {text}: unknown key {where}; valid keys: {valid}")
            node = node[key]
        last = path[-1]
        if isinstance(node, list):
            raise LowrankError(f"--set {text}: name a stage's key, e.g. stages.0.output=FOLDER")
        node[last] = value
    return data


def read_recipe(path: str | Path, assignments: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override (`--set`) and validate a recipe file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LowrankError(f"recipe {path} does not exist; pass a .yaml file such as recipes/smollm2-default.yaml") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LowrankError(f"cannot read recipe {path} ({exc}); pass a UTF-8 YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise LowrankError(f"recipe {path} is not valid YAML{at} ({problem}); fix the file") from None
    if not isinstance(data, dict):
        raise LowrankError(f"recipe {path} must be a YAML mapping with keys {', '.join(TOP_KEYS)}")
    return recipe_from_dict(apply_overrides(data, list(assignments)))


# ---- running --------------------------------------------------------------------------------------

def resolve_texts(texts: list[str]) -> list[str]:
    """`bundled:NAME` → the path of the bundled text NAME (hamlet, macbeth, tempest, julius_caesar)."""

    resolved = []
    for text in texts:
        if text.startswith("bundled:"):
            name = text.split(":", 1)[1]
            if name not in SAMPLE_TEXTS:
                raise LowrankError(f"{text} is not a bundled text; choose one of "
                                   + ", ".join(f"bundled:{n}" for n in SAMPLE_TEXTS))
            text = str(sample_text_path(name))
        resolved.append(text)
    return resolved


def stage_is_done(stage: Stage) -> bool:
    """True when the stage's output exists and is whole (compressed folders must pass `lowrank verify`)."""

    out = Path(stage.output)
    if stage.kind in ("compress", "recover"):
        if not out.is_dir():
            return False
        try:
            return verify_folder(out).ok
        except LowrankError:
            return False
    if stage.kind == "report":
        return (out / "report.json").is_file()
    try:
        return "perplexity" in json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def settings_differ(stage: Stage, wanted: dict[str, dict[str, Any]]) -> str | None:
    """The first setting in which a finished compress/recover output differs from this run's, e.g.
    'compress.ratio 0.8, not 0.6'; None when they agree (or for eval and report outputs)."""

    if stage.kind not in ("compress", "recover"):
        return None
    record = read_config_record(stage.output)
    for section, settings in wanted.items():
        saved = record.get(section, {})
        for key, value in settings.items():
            if saved.get(key) != value:
                return f"{section}.{key} {saved.get(key)!r}, not {value!r}"
    return None


def run_recipe(recipe: Recipe, *, resume: bool = False, dry_run: bool = False, overwrite: bool = False,
               progress: bool = True, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the recipe's stages in order; returns one summary per stage.

    `resume` skips a stage whose output is whole (and, for folders, made with the same settings); `dry_run` plans the compress stages (no
    factorization, nothing written) and only lists the others.
    """

    resolved_yaml = recipe.to_yaml()
    calibration = recipe.calibration.replace(texts=resolve_texts(recipe.calibration.texts))
    evaluation = recipe.eval.replace(texts=resolve_texts(recipe.eval.texts))
    recovery = recipe.recover.replace(eval_texts=resolve_texts(recipe.recover.eval_texts))
    extra = {RECIPE_FILE: resolved_yaml}
    results = []
    for number, stage in enumerate(recipe.stages, 1):
        head = f"[{number}/{len(recipe.stages)}] {stage.kind} {stage.input} → {stage.output}"
        if resume and not dry_run and stage_is_done(stage):
            wanted = ({"compress": recipe.compress.to_dict(), "calibration": calibration.to_dict()}
                      if stage.kind == "compress" else
                      {"recover": {**recovery.to_dict(), "data": resolve_texts(stage.data)}})
            differs = settings_differ(stage, wanted)
            if differs:
                raise LowrankError(f"stage {number} ({stage.kind}): {stage.output} was made with other settings "
                                   f"({differs}); remove it, give the stage another output, or drop --resume")
            echo(f"{head}: done already (verified), skipped")
            results.append({"stage": stage.kind, "output": stage.output, "skipped": True})
            continue
        if dry_run:
            if stage.kind == "compress":
                plan = api.compress(stage.input, recipe.compress, calibration, dry_run=True, progress=progress)
                s = plan.summary()
                echo(f"{head}: would keep {s['target_params']:,} of {s['target_params_dense']:,} target parameters "
                     f"(ratio {s['target_ratio']:.4f}; whole model {s['model_ratio']:.4f}), "
                     f"{s['modules_factored']}/{s['modules']} matrices factored")
                results.append({"stage": stage.kind, "output": stage.output, "dry_run": True, **s})
            else:
                echo(f"{head}: would run (dry run)")
                results.append({"stage": stage.kind, "output": stage.output, "dry_run": True})
            continue
        if Path(stage.output).exists() and not overwrite:
            why = " but is not a whole, verified output" if resume else ""
            raise LowrankError(f"stage {number} ({stage.kind}): output {stage.output} already exists{why}; remove it, "
                               "give the stage another output, or pass --overwrite")
        echo(head)
        if stage.kind == "compress":
            plan = api.compress(stage.input, recipe.compress, calibration, output=stage.output, overwrite=overwrite,
                                progress=progress, extra_files=extra)
            s = plan.summary()
            echo(f"  target layers: ratio {s['target_ratio']:.4f} (whole model {s['model_ratio']:.4f}); "
                 f"{s['modules_factored']}/{s['modules']} matrices factored")
            results.append({"stage": stage.kind, "output": stage.output, **s})
        elif stage.kind == "recover":
            result = api.recover(stage.input, recovery, resolve_texts(stage.data), output=stage.output,
                                 overwrite=overwrite, progress=progress, extra_files=extra)
            echo(f"  {result.steps} steps; held-out perplexity {result.before} → {result.after}")
            results.append({"stage": stage.kind, "output": stage.output, "steps": result.steps,
                            "eval_ppl_before": result.before, "eval_ppl_after": result.after})
        elif stage.kind == "eval":
            measure = api.compare if evaluation.against is not None else api.evaluate  # eval.against: agreement
            result = measure(stage.input, evaluation, progress=progress)
            record = {"model": stage.input, "texts": list(recipe.eval.texts) or ["bundled:macbeth"],
                      **result.to_dict(), "config": evaluation.to_dict(), "recipe": recipe.to_dict()}
            if evaluation.tasks:
                record["tasks"] = api.evaluate_tasks(stage.input, evaluation)
            atomic_write_text(Path(stage.output), json.dumps(record, indent=2) + "\n")
            if isinstance(result, EncoderAgreement):  # an encoder: agreement with its dense model, no perplexity
                echo(f"  embedding cosine mean {result.mean_cosine:.4f} min {result.min_cosine:.4f}, "
                     f"recall@10 {result.recall_at_10:.4f} over {result.sentences} sentences")
                results.append({"stage": stage.kind, "output": stage.output, **result.to_dict()})
                continue
            echo(f"  perplexity {result.perplexity:.3f} over {result.tokens:,} tokens")
            results.append({"stage": stage.kind, "output": stage.output, "perplexity": result.perplexity})
        else:
            data = api.report(stage.input, evaluation if stage.perplexity else None, output=stage.output,
                              source=stage.source, before=stage.before, overwrite=overwrite, progress=progress)
            atomic_write_text(Path(stage.output) / RECIPE_FILE, resolved_yaml)
            ppl = data["perplexity"]
            if ppl is not None:
                echo(f"  perplexity before {ppl['before']}, after {ppl['after']}")
            results.append({"stage": stage.kind, "output": stage.output, "perplexity": ppl})
    return results
