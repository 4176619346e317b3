"""What a study declares (runs, scale, split, tables) and the training config of each of its runs.

A study config (`configs/studies/NAME.py`, `get_config(arg)` with `arg` the scale) is plain data:

    name, scale ("smoke" | "demo" | "paper"), description
    data        root / layout / list_file / label_map / cache_dir / synthetic: replaces every run's `data` keys
    split       test_cases, val_fraction, folds, fold, seed (`study.splits`)
    stage_configs  {"liver", "tumor", "joint"}: the config files each stage starts from
    stage_arg   "" or "paper": the argument those files get
    scale_overrides  (("dotted.key", value), ...) applied to every stage of every run (the smoke widths ...)
    runs        ({name, pipeline: "two_stage" | "one_stage", overrides, liver, tumor, joint}, ...)
    tables      ({id, title, note, rows, columns: ({label, key, digits, published}, ...)}, ...)
    devices     how many devices each run trains on, data parallel (0: all, one run at a time)
    parallel_runs  at most this many runs at once, each on its own devices (0: as many as fit; 1: none)
    predict     which checkpoint ("best" | "latest") and the liver component connectivity
    evaluate    lesion connectivity, min_overlap, size_threshold (as `livseg_jax.evaluate`'s flags)

A run's config for one stage: the stage's config file, then `scale_overrides`, the study's `data`,
the split's training and validation case ids (`data.train_cases`, `data.val_cases`), the run's
`overrides`, then its per-stage overrides (`liver`, ...). The run reads the study's dataset exactly
as `livseg_jax.train` would with that config (its layout and `data.label_map` included).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from livseg_jax.config import MODEL_NAMES

SCALES = ("smoke", "demo", "paper")
PIPELINES = {"two_stage": ("liver", "tumor"), "one_stage": ("joint",)}
CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

# Every stage of a smoke-scale run: a three-level network a few thousand parameters wide without
# deep supervision (XLA's compile time dominates at this size), two training steps, no validation,
# small synthetic volumes. About half a minute of CPU per run: minutes for a whole study.
SMOKE_OVERRIDES = {
    "model.features": (4, 8, 8),
    "model.deep_supervision": False,
    "data.patch_size": (16, 32, 32),
    "data.batch_size": 2,
    "train.num_epochs": 1,
    "train.steps_per_epoch": 2,
    "train.log_every_steps": 1,
    "train.eval_every_epochs": 0,
    "train.checkpoint_every_epochs": 1,
    "inference.batch_size": 4,
}
# demo: the stage configs' own demo presets (narrow networks, patches of 16 x 64 x 64 / 16 x 48 x 48)
# for 4 epochs of 50 steps, on 16 synthetic cases of the default size: about a minute per stage on a GPU.
DEMO_OVERRIDES = {"train.num_epochs": 4, "train.eval_every_epochs": 2}
DEMO_SYNTHETIC = {"num_cases": 16, "shape": (160, 160, 64), "spacing": (1.5, 1.5, 3.0), "seed": 1234}
SMOKE_SYNTHETIC = {"num_cases": 6, "shape": (64, 64, 32), "spacing": (2.0, 2.0, 4.0), "seed": 1234}
# The paper's LiTS protocol: 131 cases, 20 for testing, the other 111 split 3:1 train:validation;
# without a data root, synthetic phantoms of LiTS's in-plane size stand in for them.
PAPER_SYNTHETIC = {"num_cases": 131, "shape": (512, 512, 128), "spacing": (0.75, 0.75, 2.5), "seed": 1234}


def run(name: str, pipeline: str = "two_stage", overrides: Mapping[str, Any] | None = None,
        **stage_overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Returns one run's declaration: its name, pipeline, overrides for all stages and per stage."""
    entry = {"name": name, "pipeline": pipeline, "overrides": dict(overrides or {})}
    for stage in ("liver", "tumor", "joint"):
        entry[stage] = dict(stage_overrides.pop(stage, {}) or {})
    if stage_overrides:
        raise ValueError(f"run {name!r}: unknown stage(s) {sorted(stage_overrides)}; use liver, tumor, joint")
    return entry


def column(label: str, key: str, digits: int = 3, published: Mapping[str, float] | None = None) -> dict:
    """Returns a table column: our value of metric `key` and, beside it, the published values by run."""
    return {"label": label, "key": key, "digits": int(digits), "published": dict(published or {})}


def table(table_id: str, title: str, rows: Sequence[str], columns: Sequence[dict], note: str = "") -> dict:
    """Returns a table: one row per run name (in this order), the given columns."""
    return {"id": table_id, "title": title, "rows": tuple(rows), "columns": tuple(columns), "note": note}


def parse_scale(arg: str, source: str) -> str:
    """Returns the scale named by a study config's argument ("" -> "smoke"); ValueError otherwise."""
    scale = arg or "smoke"
    if scale not in SCALES:
        raise ValueError(f"{source}: unknown scale {arg!r}; use one of {SCALES} (e.g. {source}:paper)")
    return scale


def study_config(name: str, arg: str, source: str, description: str = "") -> ml_collections.ConfigDict:
    """Returns a study's config with the scale's settings; the caller adds `runs` and `tables`."""
    scale = parse_scale(arg, source)
    c = ml_collections.ConfigDict()
    c.name = name
    c.scale = scale
    c.description = description
    c.data = ml_collections.ConfigDict(dict(
        root="", layout="auto", list_file="", label_map="", cache_dir="",
        synthetic=dict({"smoke": SMOKE_SYNTHETIC, "demo": DEMO_SYNTHETIC, "paper": PAPER_SYNTHETIC}[scale])))
    c.split = ml_collections.ConfigDict(dict(
        test_cases={"smoke": 2, "demo": 4, "paper": 20}[scale], val_fraction=0.25, folds=0, fold=0, seed=0))
    c.stage_configs = ml_collections.ConfigDict(
        {stage: str(CONFIGS_DIR / f"{stage}.py") for stage in ("liver", "tumor", "joint")})
    c.stage_arg = "paper" if scale == "paper" else ""
    c.scale_overrides = {"smoke": tuple(SMOKE_OVERRIDES.items()), "demo": tuple(DEMO_OVERRIDES.items()),
                         "paper": ()}[scale]
    c.runs = ()
    c.tables = ()
    # Devices each run trains on, data parallel (0: all visible, one run at a time; the global batch
    # must divide by it). One per run at every scale, as the paper trained: with N visible devices
    # N runs go at once, each in its own worker process (`study.scheduler`).
    c.devices = 1
    # At most this many runs at once (0: visible devices // devices; 1: one after another in one process).
    c.parallel_runs = 0
    c.predict = ml_collections.ConfigDict(dict(which="best", connectivity=1))
    c.evaluate = ml_collections.ConfigDict(dict(connectivity=3, min_overlap=0.0, size_threshold=0.6))
    return c


def run_stages(entry: Mapping[str, Any]) -> tuple[str, ...]:
    """Returns the stages a run trains: ("liver", "tumor") or ("joint",)."""
    return PIPELINES[entry["pipeline"]]


def check_study(study: ml_collections.ConfigDict, metric_keys: Sequence[str]) -> None:
    """Raises ValueError naming the setting when the study's runs or tables are malformed."""
    where = f"study {study.get('name', '?')!r}"
    if study.get("scale") not in SCALES:
        raise ValueError(f"{where}: scale must be one of {SCALES}, got {study.get('scale')!r}")
    if not study.runs:
        raise ValueError(f"{where}: declares no runs")
    names = [r["name"] for r in study.runs]
    for entry in study.runs:
        if not _RUN_NAME.match(entry["name"]):
            raise ValueError(f"{where}: run name {entry['name']!r} must be letters, digits, '_', '.', '+', '-'")
        if entry["pipeline"] not in PIPELINES:
            raise ValueError(f"{where}: run {entry['name']!r}: pipeline must be one of {tuple(PIPELINES)}, "
                             f"got {entry['pipeline']!r}")
        for stage in ("liver", "tumor", "joint"):
            if entry.get(stage) and stage not in run_stages(entry):
                raise ValueError(f"{where}: run {entry['name']!r} ({entry['pipeline']}) has no {stage!r} stage "
                                 "to override")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: run names repeat: {names}")
    for t in study.tables:
        for row in t["rows"]:
            if row not in names:
                raise ValueError(f"{where}: table {t['id']!r} names run {row!r}, which the study does not declare")
        for col in t["columns"]:
            if col["key"] not in metric_keys:
                raise ValueError(f"{where}: table {t['id']!r} column {col['label']!r}: unknown metric "
                                 f"{col['key']!r}; known: {', '.join(metric_keys)}")
            for run_name, value in col["published"].items():
                if round(float(value), col["digits"]) != float(value):
                    raise ValueError(f"{where}: table {t['id']!r} column {col['label']!r}: published {value} for "
                                     f"{run_name!r} has more than the column's {col['digits']} digits")
            stray = set(col["published"]) - set(t["rows"])
            if stray:
                raise ValueError(f"{where}: table {t['id']!r} column {col['label']!r} has published values "
                                 f"for runs not in the table: {sorted(stray)}")


def load_config_file(path: str | pathlib.Path, arg: str = "") -> ml_collections.ConfigDict:
    """Returns `get_config(arg)` of a config file (as `--config=path:arg` would)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file does not exist (study stage_configs)")
    spec = importlib.util.spec_from_file_location(f"_livseg_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def set_dotted(config: ml_collections.ConfigDict, key: str, value: Any, where: str) -> None:
    """Sets `config.<key>` (dots separate sections); ValueError naming `where` for an unknown key."""
    *sections, leaf = key.split(".")
    node = config
    for part in sections:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ValueError(f"{where}: unknown config section {part!r} in override {key!r}")
        node = node[part]
    if leaf not in node:
        raise ValueError(f"{where}: unknown config key {key!r}")
    if isinstance(value, list):
        value = tuple(value)
    node[leaf] = value


def stage_run_config(study: ml_collections.ConfigDict, entry: Mapping[str, Any], stage: str,
                     split: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Returns the training config of one stage of one run, training on `split["train"]` and
    validating on `split["val"]` (case ids of the study's dataset)."""
    config = load_config_file(study.stage_configs[stage], study.stage_arg)
    if config.stage != stage:
        raise ValueError(f"{study.stage_configs[stage]}: is a {config.stage!r} config, given as the {stage!r} one")
    where = f"study {study.name!r}, run {entry['name']!r}, stage {stage!r}"
    for key, value in study.scale_overrides:
        set_dotted(config, key, value, f"study {study.name!r} scale_overrides")
    for key in ("root", "layout", "list_file", "label_map", "cache_dir"):
        config.data[key] = study.data[key]
    config.data.synthetic = ml_collections.ConfigDict(study.data.synthetic.to_dict())
    # The split by case id: training reads the study's dataset as `livseg_jax.train` does.
    config.data.train_cases, config.data.val_cases = tuple(split["train"]), tuple(split["val"])
    config.data.num_folds, config.data.fold, config.data.num_val_cases = 0, 0, len(split["val"])
    for key, value in {**entry["overrides"], **entry[stage]}.items():
        set_dotted(config, key, value, where)
    if config.model.name not in MODEL_NAMES:
        raise ValueError(f"{where}: model.name {config.model.name!r} is not one of {MODEL_NAMES}")
    return config
