"""Predicting many CTs at full speed: reading, device work and writing of different cases overlap.

`predict_cases` runs a bounded pipeline of threads:

    reader threads --(queue, depth 2 per device)--> one worker per device --(queue)--> writer thread

- Readers (`len(predictors) + 1` threads) inflate the next CTs (`nifti.read_image_native`: int16
  as on disk, other types as float32) while the devices predict; at most `depth` (2) volumes per
  device are read or waiting, which bounds the host memory: about depth + 1 CT volumes per
  device, plus one label map being written.
- Workers: one per `Predictor`, each with the models' variables on its own device
  (`device_predictors`), take the next read case and run the whole two-stage (or joint)
  prediction of it there. Cases are sharded over the devices by whoever is free first: the
  simplest correct design (no cross-device batching; each device runs exactly the one-device
  programs, so every case's labels equal a one-device prediction).
- The writer writes each label map (atomically), its PNG overlay when asked for, and last its
  timings JSON, while the next cases are being read and predicted.

Results come back to the calling thread through `on_result`, in completion order. A case that
fails (bad input, a bug) is reported there and leaves nothing behind; the others go on. Ctrl-C or
SIGTERM in the calling thread stops the readers and workers after their current case (they are
daemon threads: the exiting process does not wait for them); the case being written is completed
first (its files are atomic either way), and the interrupt is re-raised.

Warnings raised while a case is read or predicted (HU range, header anomalies) are printed as
usual and kept in that case's record, routed per thread (`warnings.catch_warnings` is not
thread-safe, so one process-wide hook routes them instead).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import pathlib
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from livseg_jax import atomic_write
from livseg_jax.data import nifti
from livseg_jax.data.cases import sidecar_path
from livseg_jax.inference.memory import memory_record, reset_host_peak
from livseg_jax.inference.two_stage import CaseResult, PngWriter, Predictor, case_record

_DONE = object()  # end of a queue's stream


# extra_outputs(job, labels (D, H, W), CT (D, H, W), geometry) -> {record key: value}: writes a
# case's other files (DICOM-SEG, statistics ...) after its label map, before its timings JSON.
ExtraOutputs = Callable[["Job", np.ndarray, np.ndarray, nifti.Geometry], dict[str, Any]]


@dataclasses.dataclass
class Job:
    """One case to predict: its input, its label map path, its PNG path (or None) and a name.

    `read(path) -> (HU volume (D, H, W), geometry)` reads the input (default: NIfTI; `predict`
    gives a DICOM series reader for DICOM inputs; one per job, as it may keep the series read).
    `write_nifti=False` writes no label map (other formats only). `extra_outputs` writes the
    case's other files; `extra_paths` are those files, removed when the case fails.
    """

    case_id: str
    image: pathlib.Path
    output: pathlib.Path
    png: pathlib.Path | None = None
    read: Callable[[Any], tuple[np.ndarray, nifti.Geometry]] = nifti.read_image_native
    write_nifti: bool = True
    extra_outputs: ExtraOutputs | None = None
    extra_paths: tuple[pathlib.Path, ...] = ()


@dataclasses.dataclass
class Outcome:
    """What became of one job: its record (written as its timings JSON), or the error that stopped it."""

    job: Job
    record: dict[str, Any] | None = None
    error: BaseException | None = None


@dataclasses.dataclass
class _Read:
    job: Job
    image: np.ndarray | None = None
    geometry: nifti.Geometry | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    error: BaseException | None = None
    result: CaseResult | None = None
    device: str = ""
    device_object: Any = None


def device_predictors(predictor: Predictor, devices: Sequence[jax.Device] | None = None) -> list[Predictor]:
    """Returns one Predictor per device (default: every visible one), its models' variables put there.

    Call it before `warmup`: each copy then compiles its stages ahead of time for its own device
    (an executable is tied to the device of its variables). With only the default device, that
    is `predictor` itself.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("no devices to predict on")
    if predictor.compile_seconds:
        raise ValueError("device_predictors needs a predictor not yet warmed up: its compiled stages are "
                         "tied to one device")

    def on(model, device):
        return None if model is None else dataclasses.replace(model, variables=jax.device_put(model.variables, device))

    if devices == [jax.devices()[0]]:  # the default device already holds the variables
        return [predictor]
    copies = []
    for device in devices:
        clone = copy.copy(predictor)  # keeps a subclass's behaviour (and the settings)
        clone.liver, clone.tumor, clone.joint = (on(m, device) for m in (predictor.liver, predictor.tumor,
                                                                           predictor.joint))
        clone.device = device
        clone.compile_seconds = {}  # each copy compiles its stages for its own device
        copies.append(clone)
    return copies


class _WarningRouter:
    """While active, every warning is shown as usual and also appended to the calling thread's list."""

    def __init__(self) -> None:
        self.local = threading.local()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with warnings.catch_warnings():  # restores the filters and the hook afterwards
            warnings.simplefilter("always")
            shown = warnings.showwarning

            def route(message, category, filename, lineno, file=None, line=None):
                collected = getattr(self.local, "collected", None)
                if collected is not None:
                    collected.append(str(message))
                shown(message, category, filename, lineno, file, line)

            warnings.showwarning = route
            yield

    @contextlib.contextmanager
    def collect(self, into: list[str]) -> Iterator[None]:
        self.local.collected = into
        try:
            yield
        finally:
            self.local.collected = None


def _cleanup(job: Job) -> None:
    """Removes whatever a failed case may have written (its label map, PNG, other outputs and timings JSON)."""
    for path in (job.output, job.png, sidecar_path(job.output, "_timings.json"), *job.extra_paths):
        if path is not None:
            pathlib.Path(path).unlink(missing_ok=True)


def predict_cases(
    predictors: Sequence[Predictor],
    jobs: Sequence[Job],
    on_result: Callable[[Outcome], None],
    run_info: dict[str, Any] | None = None,
    png_writer: PngWriter | None = None,
    progress_for: Callable[[str], Callable | None] | None = None,
    depth: int = 2,
) -> list[Outcome]:
    """Returns the outcome of every job (completion order) after predicting them through the pipeline.

    `predictors`: one per device (`device_predictors`). `on_result` is called in this thread as
    each case completes (written or failed). `run_info` goes into every timings JSON as "run".
    `progress_for(case_id)` returns a sliding-window progress function (`two_stage.ProgressFn`) or
    None. `depth`: read cases waiting per device.
    """
    if not predictors:
        raise ValueError("predict_cases needs at least one predictor")
    if depth < 1:
        raise ValueError(f"pipeline depth must be >= 1, got {depth}")
    if any(job.png is not None for job in jobs) and png_writer is None:
        raise ValueError("PNG outputs need a png_writer")
    # One case alone: the peak is its own; several overlap, so the peak covers the run so far.
    host_scope = "this case" if len(jobs) == 1 else "this run so far (cases overlap)"
    stop = threading.Event()
    router = _WarningRouter()
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    n_readers = min(len(jobs), len(predictors) + 1) or 1
    # Read volumes not yet taken by a device, counting those being read: the memory bound.
    slots = threading.Semaphore(depth * len(predictors))
    ready: queue.Queue = queue.Queue()
    to_write: queue.Queue = queue.Queue(maxsize=depth)
    done: queue.Queue = queue.Queue()
    readers_left = [n_readers]
    workers_left = [len(predictors)]
    lock = threading.Lock()
    writing = threading.Lock()

    def read() -> None:
        while not stop.is_set():
            if not slots.acquire(timeout=0.2):
                continue
            try:
                job = todo.get_nowait()
            except queue.Empty:
                slots.release()
                break
            item = _Read(job)
            start = time.perf_counter()
            try:
                with router.collect(item.warnings):
                    item.image, item.geometry = job.read(job.image)
            except Exception as e:  # noqa: BLE001 - reported with the case
                item.error = e
            item.seconds["read"] = time.perf_counter() - start
            item.seconds["queued_from"] = time.perf_counter()
            ready.put(item)
        with lock:
            readers_left[0] -= 1
            if readers_left[0] == 0:
                for _ in predictors:
                    ready.put(_DONE)

    def work(predictor: Predictor) -> None:
        device = getattr(predictor, "device", None)
        with jax.default_device(device) if device is not None else contextlib.nullcontext():
            while True:
                item = ready.get()
                if item is _DONE:
                    break
                slots.release()
                if stop.is_set() or item.error is not None:
                    to_write.put(item)
                    continue
                item.seconds["wait_for_device"] = time.perf_counter() - item.seconds.pop("queued_from")
                item.device_object = device or jax.devices()[0]
                item.device = str(item.device_object)
                try:
                    with router.collect(item.warnings):
                        progress = progress_for(item.job.case_id) if progress_for is not None else None
                        item.result = predictor.predict_array(item.image, item.geometry.spacing, progress)
                except Exception as e:  # noqa: BLE001 - reported with the case
                    item.error = e
                if not item.job.png and item.job.extra_outputs is None:
                    item.image = None  # the writer needs the CT only for an overlay or other outputs
                to_write.put(item)
        with lock:
            workers_left[0] -= 1
            if workers_left[0] == 0:
                to_write.put(_DONE)

    def write() -> None:
        while True:
            item = to_write.get()
            if item is _DONE:
                break
            outcome = Outcome(item.job, error=item.error)
            with writing:  # an interrupted run waits for this write only
                if item.error is None and not stop.is_set():
                    try:
                        outcome.record = _write_case(item, run_info, png_writer, host_scope)
                    except Exception as e:  # noqa: BLE001 - reported with the case
                        outcome.error = e
                elif item.error is None:
                    outcome.error = KeyboardInterrupt("stopped before writing")
            # A failed case leaves nothing behind; a case the stop kept from running touches nothing
            # (its files, if any, are an earlier run's complete outputs).
            if outcome.error is not None and not isinstance(outcome.error, KeyboardInterrupt):
                _cleanup(item.job)
            done.put(outcome)
        done.put(_DONE)

    outcomes: list[Outcome] = []
    reset_host_peak()
    with router.active():
        threads = [threading.Thread(target=read, daemon=True, name=f"livseg-read-{i}") for i in range(n_readers)]
        threads += [threading.Thread(target=work, args=(p,), daemon=True, name=f"livseg-device-{i}")
                    for i, p in enumerate(predictors)]
        writer = threading.Thread(target=write, daemon=True, name="livseg-write")
        for thread in [*threads, writer]:
            thread.start()
        try:
            while (outcome := done.get()) is not _DONE:
                outcomes.append(outcome)
                on_result(outcome)
        except BaseException:
            stop.set()  # readers and workers stop after their current case; nothing new is written
            with writing:  # the case being written completes (its files are atomic either way)
                raise
    return outcomes


def _write_case(item: _Read, run_info: dict[str, Any] | None, png_writer: PngWriter | None,
                host_scope: str) -> dict[str, Any]:
    """Returns the case's record after writing its label map, PNG (if asked for) and timings JSON."""
    job, result, seconds = item.job, item.result, item.seconds
    start = time.perf_counter()
    if job.write_nifti:
        nifti.write_label_map(result.labels, item.geometry, job.output)
    extra = job.extra_outputs(job, result.labels, item.image, item.geometry) if job.extra_outputs else {}
    seconds["write"] = time.perf_counter() - start
    if job.png is not None:
        png_start = time.perf_counter()
        png_writer(job.png, item.image, item.geometry.spacing, result.labels, job.image.name)
        seconds["png"] = time.perf_counter() - png_start
    timings = {"read": seconds["read"], **result.timings, "write": seconds["write"],
               **({"png": seconds["png"]} if "png" in seconds else {})}
    timings["total"] = sum(timings.values())  # this case's own work; waits are apart
    timings["wait_for_device"] = seconds.get("wait_for_device", 0.0)
    record = case_record(job.image, job.output if job.write_nifti else None, job.png, item.geometry, result,
                         item.warnings, timings)
    record = {"case_id": job.case_id, **record, **extra, "device": item.device,
              "memory": memory_record(item.device_object, host_scope),
              **({"run": run_info} if run_info is not None else {})}
    atomic_write.write_json(sidecar_path(job.output, "_timings.json"), record)
    return record
