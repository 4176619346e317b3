"""`train_and_evaluate(config, workdir)`: the whole training run, resumable from its workdir."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from livseg_jax.config import default_cache_root
from livseg_jax.data import pipeline
from livseg_jax.data.augment_device import device_augment_settings
from livseg_jax.data.cache import build_cache
from livseg_jax.data.folds import given_split, load_or_save_split, make_training_split
from livseg_jax.data.layouts import discover
from livseg_jax.data.preprocess import PreprocessSettings
from livseg_jax.data.regions import largest_component
from livseg_jax.data.spacing import resolve_median_spacing
from livseg_jax.data.stages import check_stage, stage_target
from livseg_jax.data.synthetic import write_synthetic_dataset
from livseg_jax.inference.memory import memory_record
from livseg_jax.inference.sliding_window import sliding_window, window_predict_fn
from livseg_jax.metrics import overlap_metrics
from livseg_jax.models import build_model, check_patch_shape
from livseg_jax.models.forms import check_training_forms
from livseg_jax.run_dir import METRICS_FILE, PERIODIC, RunCheckpoints, check_resumable, save_config
from livseg_jax.training.compile_ahead import compile_ahead
from livseg_jax.training.distributed import chief_first, process_label
from livseg_jax.training.executable_cache import executable_cache_dir, program_key
from livseg_jax.training.logging import MetricWriter, plot_curves
from livseg_jax.training.schedules import make_optimizer
from livseg_jax.training.state import TrainState, init_lowering, jit_create_train_state
from livseg_jax.training.step import (
    batch_sharding,
    check_global_batch,
    jit_train_step,
    make_mesh,
    make_train_step,
    replicated,
)
from livseg_jax.training.step_programs import (
    PROGRAM_NAMES,
    check_step_programs,
    switch_compile_options,
    switches_to_one_program,
)
from livseg_jax.training.thread_context import collector_paused


def cache_root(config: ml_collections.ConfigDict) -> pathlib.Path:
    """Returns where synthetic data and preprocessed cases are cached."""
    if config.data.cache_dir:
        return pathlib.Path(config.data.cache_dir).expanduser()
    return default_cache_root()


def dataset_cases(config: ml_collections.ConfigDict):
    """Returns the dataset's CaseFiles: discovered under data.root, or the built-in synthetic set."""
    if config.data.root or config.data.list_file:
        return discover(config.data.root, config.data.layout, config.data.list_file,
                        config.data.get("label_map", ""))
    syn = config.data.synthetic
    key = hashlib.sha1(json.dumps(syn.to_dict(), sort_keys=True, default=list).encode()).hexdigest()[:10]
    return write_synthetic_dataset(cache_root(config) / f"synthetic-{key}", syn.num_cases,
                                   tuple(syn.shape), tuple(syn.spacing), syn.seed)


def training_split(config: ml_collections.ConfigDict, case_ids: Sequence[str]) -> dict[str, Any]:
    """Returns the run's split of `case_ids`: `data.train_cases` / `data.val_cases` when given
    (`folds.given_split`), else `folds.make_training_split`: k-fold with `data.num_folds` >= 2,
    else the last `data.num_val_cases` cases held out."""
    if config.data.get("train_cases") or config.data.get("val_cases"):
        return given_split(case_ids, config.data.get("train_cases", ()), config.data.get("val_cases", ()),
                           int(config.data.get("num_folds", 0)))
    return make_training_split(case_ids, int(config.data.get("num_folds", 0)), int(config.data.get("fold", 0)),
                               int(config.seed), int(config.data.num_val_cases))


def split_cases(config: ml_collections.ConfigDict, cases: Sequence, workdir: str | os.PathLike | None = None,
                write: bool = True) -> tuple[list, list]:
    """Returns the (train, validation) CaseFiles of `cases` in the run's split; with `workdir`, the
    split is saved there as `splits.json` (when `write`) or checked against the one saved
    (`folds.load_or_save_split`). Needs no JAX."""
    split = training_split(config, [c.case_id for c in cases])
    if workdir is not None:
        split = load_or_save_split(workdir, split, write=write)
    by_id = {c.case_id: c for c in cases}
    return [by_id[c] for c in split["train"]], [by_id[c] for c in split["val"]]


def split_case_files(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> tuple[list, list]:
    """Returns the (train, validation) CaseFiles of the run's split (`split_cases`), process 0
    finding the cases and saving the split first."""
    cases = chief_first("dataset", lambda: dataset_cases(config))
    return split_cases(config, cases, workdir, write=jax.process_index() == 0)


def cache_stage_cases(config: ml_collections.ConfigDict, train_files: Sequence, val_files: Sequence) -> list:
    """Returns the cases preprocessed into the stage's cache (building what is missing), without JAX.

    With `preprocess.spacing_mode = "median"` it first sets `config.preprocess.target_spacing` from
    the training cases. The study scheduler calls this in its parent process so that worker
    processes only read the caches.
    """
    if config.preprocess.get("spacing_mode") == "median":  # stored in config.json by train_and_evaluate
        config.preprocess.target_spacing = resolve_median_spacing(config.preprocess, [c.image for c in train_files])
        print(f"preprocess.target_spacing = {tuple(config.preprocess.target_spacing)} mm (median rule)")
    return build_cache([*train_files, *val_files], config.preprocess, cache_root(config) / "preprocessed",
                       num_workers=config.data.num_workers)


def prepare_stage_cases(config: ml_collections.ConfigDict,
                        workdir: str | os.PathLike | None = None) -> tuple[list, list]:
    """Returns (train, validation) StageCases of the run's split (`split_case_files`)."""
    source = config.data.tumor_crop_source
    if source not in ("ground_truth", "stage1"):
        raise ValueError(f"data.tumor_crop_source must be 'ground_truth' or 'stage1', got {source!r}")
    if config.stage == "tumor" and source == "stage1" and not config.data.stage1_run:
        raise ValueError("data.tumor_crop_source='stage1' needs data.stage1_run (a liver run or checkpoint)")
    train_files, val_files = split_case_files(config, workdir)
    n_val = len(val_files)
    cached = chief_first("cache", lambda: cache_stage_cases(config, train_files, val_files))
    liver_masks = [None] * len(cached)
    if config.stage == "tumor" and source == "stage1":
        liver_masks = stage1_liver_masks(config, cached)
    staged = [pipeline.index_case(c, config.stage, config.data.liver_margin_mm, config.seed, mask)
              for c, mask in zip(cached, liver_masks, strict=True)]
    return staged[: len(staged) - n_val], staged[len(staged) - n_val:]


def stage1_liver_masks(config: ml_collections.ConfigDict, cached) -> list[np.ndarray]:
    """Returns the stage-1 model's liver (largest component) on each cached, preprocessed case."""
    from livseg_jax.inference.two_stage import load_stage_model, stage_mask

    liver = load_stage_model(config.data.stage1_run, expected_stage="liver")
    ours = PreprocessSettings.from_config(config.preprocess)
    if ours != liver.preprocessing:
        raise ValueError(f"{config.data.stage1_run}: the liver model was trained with preprocessing "
                         f"{liver.preprocessing.to_dict()}, this run uses {ours.to_dict()}; crops would not line up")
    masks = []
    for case in tqdm.tqdm(cached, desc="stage-1 liver crops", unit="case"):
        masks.append(largest_component(stage_mask(liver, np.asarray(case.image))))
    return masks


def validate(model, variables, cases: Sequence[pipeline.StageCase], config, predict_fn) -> dict[str, float]:
    """Returns the validation scores of full-volume sliding-window predictions, "dice" the criterion.

    Binary stages: {"dice", "dice_<case>"...}, the foreground Dice. Stage "joint": liver (label >= 1)
    and tumour (label 2) Dice per case ("dice_liver_<case>", "dice_tumor_<case>"), their means over
    cases ("dice_liver", "dice_tumor"), and "dice" = the mean of those two, so the best checkpoint
    weighs both structures equally (the two-stage pair is judged on each structure separately).
    """
    scores = {}
    window = tuple(config.inference.window) or tuple(config.data.patch_size)
    for case in cases:
        image, label = case.load()
        target = stage_target(np.asarray(label), config.stage)
        labels = sliding_window(np.asarray(image), predict_fn, variables, window, config.inference.overlap,
                                config.inference.batch_size, config.inference.gaussian_sigma_scale,
                                PreprocessSettings.from_config(config.preprocess).air_value,
                                num_classes=config.model.num_classes)
        # Both masks empty counts as Dice 1 (docs/metrics.md).
        if config.stage == "joint":
            scores[f"dice_liver_{case.case_id}"] = overlap_metrics(labels >= 1, target >= 1)["dice"]
            scores[f"dice_tumor_{case.case_id}"] = overlap_metrics(labels == 2, target == 2)["dice"]
        else:
            scores[f"dice_{case.case_id}"] = overlap_metrics(labels > 0, target > 0)["dice"]
    if config.stage == "joint":
        for structure in ("liver", "tumor"):
            scores[f"dice_{structure}"] = float(np.mean([scores[f"dice_{structure}_{c.case_id}"] for c in cases]))
        scores["dice"] = (scores["dice_liver"] + scores["dice_tumor"]) / 2
    else:
        scores["dice"] = float(np.mean(list(scores.values())))
    return scores


def _check_finite(pending: list[tuple[int, dict]], ckpt: RunCheckpoints, workdir: pathlib.Path) -> list:
    host = [(s, jax.device_get(m)) for s, m in pending]
    for s, m in host:
        if not np.isfinite(m["loss"]):
            last = ckpt.latest_step()
            where = f"step {last} in {workdir / PERIODIC}" if last is not None else "none saved yet"
            raise FloatingPointError(
                f"training loss is {float(m['loss'])} at step {s}; stopping. Last good checkpoint: {where}")
    return host


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """Trains (resuming from `workdir` if it holds checkpoints) and returns a summary dict."""
    workdir = pathlib.Path(workdir)
    check_stage(config.stage, config.model.num_classes)
    check_patch_shape(tuple(config.data.patch_size), len(config.model.features),
                      config.model.get("spatial_dims", 3))
    augment = device_augment_settings(config.data)  # checked before any work
    mesh = make_mesh(devices)
    check_global_batch(config.data.batch_size, mesh)
    is_chief = jax.process_index() == 0

    check_training_forms(config.model, jax.default_backend())  # before minutes of preprocessing
    train_cases, val_cases = prepare_stage_cases(config, workdir)
    spe = int(config.train.steps_per_epoch)
    total_steps = int(config.train.num_epochs) * spe
    model = build_model(config.model, deploy=False)
    optimizer = make_optimizer(config.optim, spe)

    # The initialisation is traced once, here: its output types are the step's, and its lowering and
    # compile follow in the background. Traced a second time there, it took 2-4 s from the step's own
    # tracing on an H200 host, both holding Python's lock (session 12).
    with init_lowering(), collector_paused():
        init_traced = jit_create_train_state(model, optimizer, config.seed, replicated(mesh)).trace()
    whole = replicated(mesh)
    state_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), init_traced.out_info)
    in_sharding = batch_sharding(mesh)
    batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=in_sharding)
                  for k, v in pipeline.batch_spec(config.data, config.data.batch_size).items()}
    train_step = make_train_step(model, optimizer, config.loss, spe, augment,
                                 config.train.get("batch_norm_stats", "global"), mesh)
    donate = bool(config.train.get("donate_state", True))
    background = bool(config.train.get("compile_ahead", True))
    executables_dir = executable_cache_dir()  # None unless JAX's persistent cache is on (train turns it on)

    def program_file(name: str, args) -> pathlib.Path | None:
        if executables_dir is None:
            return None
        return executables_dir / f"{name.replace(' ', '_')}-{program_key(name, config, args)}.pkl"

    # train.step_programs 2 or 3 (None: 2 on GPUs, one process): the first steps run as that many programs, which
    # compile sooner, while the one program compiles in the background; the loop switches to it once it
    # is ready, since the parts' steps are slower (training/step_programs.py). A run that finds the one
    # program in the compiled-program cache loads it and skips the parts. The parts are not kept there:
    # the one program always follows them (a run that ends first waits for its compile), and serialising
    # them held Python's lock for ~2 s just after the first step (the H200's 1.22 + 0.96 s, session 13).
    # Several processes keep no compiled programs at all (executable_cache_dir).
    specs = (state_spec, batch_spec)
    step_name, step_fn = "train step", jit_train_step(train_step, mesh, donate, 1)
    step_file = one_program_file = program_file(step_name, specs)
    one_program_later = None
    processes, backend = jax.process_count(), jax.default_backend()
    parts = check_step_programs(config.train.get("step_programs"), backend, processes)
    if parts > 1 and not (one_program_file is not None and one_program_file.exists()):
        if switches_to_one_program(parts, processes):
            one_program_later = step_fn
        elif is_chief:
            print(f"note: train.step_programs = {parts} with {processes} processes: every step runs as "
                  f"{PROGRAM_NAMES[parts]} (the processes could not switch to the one program at the same step)",
                  flush=True)
        step_name, step_fn = f"train step ({PROGRAM_NAMES[parts]})", jit_train_step(train_step, mesh, donate, parts)
        step_file = None

    with contextlib.ExitStack() as stack:
        # Closed however the run ends: orbax's background work outliving the interpreter fails loudly.
        ckpt = stack.enter_context(contextlib.closing(RunCheckpoints(workdir, config.train.keep_checkpoints)))
        start = ckpt.latest_step() or 0
        if start:  # a refused resume must not wait for a compile first
            check_resumable(config, workdir)

        one_program_job = None  # for a run that starts as parts: the one program, compiled after the first step

        def start_compile():
            nonlocal one_program_job
            if is_chief:
                where = "in the background" if background else "now"
                print(f"compiling the train step {where} (from the compilation cache once it holds this "
                      "program; compiling can take minutes on a CPU)", flush=True)
            # Its store to the compiled-program cache waits for the first step (released below).
            job = stack.enter_context(compile_ahead(step_fn, state_spec, batch_spec, name=step_name,
                                                    cache_file=step_file, defer_store=True))
            if one_program_later is not None:
                # The one program is traced and lowered once the parts are (Python's lock is then free
                # while XLA compiles them and the first step waits), and compiled after the first step,
                # so that its trace no longer stalls the first steps' dispatch and its compile does not
                # take cores from the parts' (H200, session 14).
                one_program_job = stack.enter_context(compile_ahead(
                    one_program_later, state_spec, batch_spec, name="train step (one program)",
                    cache_file=one_program_file, after=job.lowered, hold_compile=True,
                    compiler_options=switch_compile_options(config.train.get("switch_compile_threads", 0), backend)))
            return job

        # Ahead: the step compiles while the state is made and the first batch read; else at the first step.
        ahead = start_compile() if background and start < total_steps else None
        made_start = time.perf_counter()  # making the state, the pipeline and the step: the first step's cost
        if start:
            state: TrainState = ckpt.restore(start, state_spec)
            print(f"{process_label()}resuming from step {start} ({workdir / PERIODIC})")
        else:
            if is_chief:
                print("initialising the model (its first run compiles the initialisation: up to a minute or two "
                      "on a CPU)", flush=True)
            # initial_train_state's program, compiled (or loaded) by the same means as the step, once the
            # step is lowered: the first step waits for the step's compile, not for the state (H200, session 12).
            if ahead is not None:
                ahead.lowered.wait()
            init_job = stack.enter_context(compile_ahead(
                init_traced, name="initialisation", cache_file=program_file("initialisation", state_spec),
                within=init_lowering))
            state = init_job.result()()
        state_ready_s = time.perf_counter() - made_start

        if is_chief:  # only now: config.json must keep describing the checkpoints beside it
            save_config(workdir, config)
            ckpt.forget_after(start)
        writer = MetricWriter(workdir, config.train.tensorboard, is_chief)
        writer.truncate_after(start)
        sampler = pipeline.PatchSampler(train_cases, config.stage, config.data, config.seed,
                                        PreprocessSettings.from_config(config.preprocess).air_value)
        dataset = pipeline.make_dataset(sampler, config.data.batch_size, total_steps, start,
                                        jax.process_index(), jax.process_count())
        batches = pipeline.batch_iterator(dataset, config.data.num_workers, config.data.prefetch)
        predict_fn = window_predict_fn(lambda v, x: model.apply(v, x, train=False), config.inference.mirror_tta)

        summary: dict[str, Any] = {"start_step": start, "best_dice": ckpt.best_dice(),
                                   "initialisation_loaded": None if start else init_job.loaded,
                                   "state_ready_s": round(state_ready_s, 1)}
        pending: list[tuple[int, dict]] = []
        bar: tqdm.tqdm | None = None
        compiled_step, switch = None, None
        tick, tick_step = time.perf_counter(), start
        try:
            for step in range(start, total_steps):
                batch = pipeline.to_global_batch(next(batches), in_sharding)
                if compiled_step is None:  # the bar starts once the step is ready: its rate and ETA exclude compiling
                    summary["first_batch_s"] = round(time.perf_counter() - made_start, 1)
                    ahead = ahead or start_compile()
                    wait_start = time.perf_counter()
                    compiled_step = ahead.result()
                    summary["train_step_compile_s"] = round(ahead.seconds, 1)
                    summary["train_step_wait_s"] = round(time.perf_counter() - wait_start, 1)
                    if is_chief:
                        how = ("loaded from the compiled-program cache" if ahead.loaded
                               else "traced and compiled, or loaded from the compilation cache")
                        where = " in the background" if background else ""
                        print(f"train step ready in {ahead.seconds:.1f} s ({how}){where}; the first step waited "
                              f"{summary['train_step_wait_s']:.1f} s for it", flush=True)
                    summary["train_step_loaded"] = ahead.loaded
                    bar = tqdm.tqdm(total=total_steps, initial=step, desc=f"train {config.stage}", unit="step",
                                    disable=not is_chief, dynamic_ncols=True)
                    tick = time.perf_counter()
                if switch is not None and switch.ready():  # the one program, compiled in the background
                    compiled_step, switch = switch.result(), None
                    summary["one_program_from_step"] = step
                    if is_chief:
                        bar.write(f"step {step}: switched to the train step compiled as one program")
                state, metrics = compiled_step(state, batch)
                if "first_step_s" not in summary:  # one wait, so that it counts the step's run
                    jax.block_until_ready(metrics)
                    summary["first_step_s"] = round(time.perf_counter() - made_start, 1)
                    # Serialising the step for the compiled-program cache holds Python's lock for a second
                    # or more; begun with the compile's result, it made the first step wait (session 13).
                    ahead.release_store()
                    if is_chief:
                        bar.write(f"first step done {summary['first_step_s']:.1f} s after the state, the input "
                                  f"pipeline and the step's compile started (state ready at "
                                  f"{summary['state_ready_s']:.1f} s, first batch at {summary['first_batch_s']:.1f} s)")
                    if one_program_job is not None:
                        if is_chief:
                            bar.write("compiling the train step as one program in the background; the steps "
                                      "switch to it once it is ready")
                        switch = one_program_job
                        switch.release_compile()
                done = step + 1
                pending.append((done, metrics))
                epoch_end = done % spe == 0
                if done % config.train.log_every_steps == 0 or epoch_end:
                    host = _check_finite(pending, ckpt, workdir)
                    pending = []
                    now = time.perf_counter()
                    rate = (done - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, done
                    last = {k: float(v) for k, v in host[-1][1].items()}
                    writer.write(done, "train", {**last, "steps_per_sec": rate})
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['learning_rate']:.2e}",
                                    steps_s=f"{rate:.2f}")
                bar.update(1)
                if not epoch_end:
                    continue
                epoch = done // spe
                last_epoch = done == total_steps
                every = int(config.train.eval_every_epochs)  # <= 0: no validation
                if val_cases and every > 0 and (epoch % every == 0 or last_epoch):
                    if is_chief and "last_dice" not in summary:  # the first validation compiles the window prediction
                        bar.write("compiling the validation step (first validation only with the compilation "
                                  "cache; this can take a minute on a CPU)")
                    scores = validate(model, state.variables, val_cases, config, predict_fn)
                    writer.write(done, "val", {**scores, "epoch": epoch})
                    summary["last_dice"] = scores["dice"]
                    per_class = ""
                    if config.stage == "joint":
                        per_class = f" (liver {scores['dice_liver']:.4f}, tumour {scores['dice_tumor']:.4f})"
                    bar.write(f"epoch {epoch}: validation Dice {scores['dice']:.4f}{per_class}")
                    if scores["dice"] > summary["best_dice"]:
                        summary["best_dice"] = scores["dice"]
                        ckpt.save_best(done, state, scores["dice"])
                # Saved after this epoch's validation, so a run killed during validation redoes it.
                if epoch % config.train.checkpoint_every_epochs == 0 or last_epoch:
                    ckpt.save(done, state)
        finally:
            if bar is not None:
                bar.close()
            writer.close()
            if switch is not None and not switch.ready() and is_chief:
                print("waiting for the one-program train step's background compile to finish (kept in the "
                      "compiled-program cache for the next run)", flush=True)
    if is_chief and (workdir / METRICS_FILE).exists():
        summary["curves"] = str(plot_curves(workdir))
    summary["final_step"] = int(jax.device_get(state.step))
    summary["device_peak_gib"] = memory_record(jax.local_devices()[0])["device_peak_gib"]  # None on CPUs
    summary["state"] = state
    return summary
