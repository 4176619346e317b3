"""Fault injection: full disks, signals and kills at write time, interrupted best-checkpoint saves,
and resumes that would change what a run's checkpoints mean (issue 19, items 4, 5 and 7)."""

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import async_path

from livseg_jax import atomic_write, predict, run_dir
from livseg_jax.config import base_config
from livseg_jax.data import cache
from livseg_jax.data.synthetic import write_synthetic_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _listing(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir())


# ------------------------------------------------------------------------------- full disk


def test_full_disk_during_a_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = atomic_write.write_json(tmp_path / "record.json", {"old": True})

    def half_then_full(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise _enospc()

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write.write_json(target, {"new": list(range(100))})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert _listing(tmp_path) == ["record.json"]


def test_full_disk_during_a_cache_build_leaves_no_entry_and_the_next_build_completes(tmp_path, monkeypatch):
    cases = write_synthetic_dataset(tmp_path / "data", 1, (48, 48, 16), (3.0, 3.0, 3.0), seed=0)
    settings = base_config().preprocess
    real_save = np.save
    calls = []

    def save_then_full(f, array, *args, **kwargs):
        calls.append(array.shape)
        if len(calls) == 2:  # the label, after the image was written completely
            f.write(b"\x93NUMPY partial")
            raise _enospc()
        real_save(f, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_then_full)
    with pytest.raises(OSError, match="No space left"):
        cache.build_cache(cases, settings, tmp_path / "cache", progress=False)
    monkeypatch.undo()
    entry_dir = next((tmp_path / "cache").iterdir())
    # The image written before the failure has no JSON: not an entry, rebuilt next time.
    assert _listing(entry_dir) == ["settings.json", "volume-0.image.npy"]
    built = cache.build_cache(cases, settings, tmp_path / "cache", progress=False)
    assert built[0].label is not None and built[0].label.shape == built[0].image.shape
    assert sorted(_listing(entry_dir)) == sorted(["settings.json", "volume-0.image.npy", "volume-0.label.npy",
                                                  "volume-0.json"])


def test_full_disk_during_the_import_leaves_no_half_case(tmp_path, monkeypatch):
    pytest.importorskip("pydicom")
    from test_ircadb import _make_patient

    from livseg_jax.data import ircadb

    patient = _make_patient(tmp_path / "3Dircadb1.3", zipped=True)
    real_save = ircadb.save_nifti
    calls = []

    def second_write_fills_the_disk(img, path):
        calls.append(path)
        if len(calls) % 2 == 0:
            pathlib.Path(path).write_bytes(b"\x1f\x8b partial")
            raise _enospc()
        return real_save(img, path)

    out = tmp_path / "out"
    monkeypatch.setattr(ircadb, "save_nifti", second_write_fills_the_disk)
    with pytest.raises(OSError, match="No space left"):
        ircadb.import_ircadb(patient, out, log=None)
    assert _listing(out) == []  # neither file, no temporaries
    monkeypatch.undo()

    ircadb.import_ircadb(patient, out, log=None)
    before = {name: (out / name).read_bytes() for name in _listing(out)}
    assert sorted(before) == ["segmentation-3.nii.gz", "volume-3.nii.gz"]
    monkeypatch.setattr(ircadb, "save_nifti", second_write_fills_the_disk)
    with pytest.raises(OSError, match="No space left"):
        ircadb.import_ircadb(patient, out, log=None)
    assert {name: (out / name).read_bytes() for name in _listing(out)} == before  # the old pair, whole


# ------------------------------------------------------------------------------- signals and kills

WRITER = """
import sys, time
from livseg_jax import atomic_write
if sys.argv[2] == "handled":
    atomic_write.exit_on_sigterm()
with atomic_write.atomic_path(sys.argv[1]) as tmp, open(tmp, "wb") as f:
    f.write(b"x" * 4096)
    f.flush()
    print(tmp, flush=True)
    time.sleep(60)
    f.write(b"end")
"""


def _start_writer(target, mode):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), mode], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = pathlib.Path(proc.stdout.readline().strip())
    assert tmp.is_file() and tmp.parent == target.parent, proc.stderr.read()
    return proc, tmp


def _sweep_in_a_new_process(folder):
    """The next run's start: returns (removed names, stderr)."""
    code = ("import sys; from livseg_jax.atomic_write import sweep_stale_temps; "
            "print('\\n'.join(p.name for p in sweep_stale_temps(sys.argv[1])))")
    result = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split(), result.stderr


def test_sigterm_during_a_write_cleans_up_like_ctrl_c(tmp_path):
    target = tmp_path / "labels.nii.gz"
    proc, tmp = _start_writer(target, "handled")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert _listing(tmp_path) == []  # no target, no temporary
    assert "Traceback" not in proc.stderr.read()


def test_sigkill_leaves_a_temporary_that_the_next_start_removes_and_nothing_else(tmp_path):
    target = tmp_path / "labels.nii.gz"
    killed, killed_tmp = _start_writer(target, "plain")
    killed.kill()
    assert killed.wait(timeout=30) == -signal.SIGKILL
    live, live_tmp = _start_writer(tmp_path / "other.json", "plain")  # still writing during the sweep
    old_style = tmp_path / ".x.json.999999-0123abcd.tmp.json"  # an earlier version's name: no origin
    old_style.write_text("?")
    hour_ago = time.time() - 7200
    os.utime(old_style, (hour_ago, hour_ago))
    others = [tmp_path / ".hidden.tmp", tmp_path / "notes.txt", tmp_path / ".labels.nii.gz.tmp.nii.gz"]
    for path in others:
        path.write_text("keep")
    try:
        assert killed_tmp.is_file() and not target.exists()
        removed, stderr = _sweep_in_a_new_process(tmp_path)
        assert removed == [killed_tmp.name]
        assert not killed_tmp.exists() and live_tmp.is_file()
        assert old_style.exists() and old_style.name in stderr and "unknown writers" in stderr
        assert all(path.read_text() == "keep" for path in others)
    finally:
        live.kill()
        live.wait(timeout=30)


def test_sweeping_a_missing_folder_does_nothing(tmp_path):
    assert atomic_write.sweep_stale_temps(tmp_path / "absent") == []


def test_refuse_overwrite_names_an_existing_file_or_full_folder_unless_forced(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    (tmp_path / "empty").mkdir()
    free = [tmp_path / "absent", tmp_path / "empty"]
    atomic_write.refuse_overwrite(free)  # nothing there to lose
    with pytest.raises(FileExistsError, match=r"file: exists; pass --force"):
        atomic_write.refuse_overwrite([*free, tmp_path / "file"])
    with pytest.raises(FileExistsError, match=r"full: folder exists and is not empty; pass --force"):
        atomic_write.refuse_overwrite([tmp_path / "full", tmp_path / "file"])
    atomic_write.refuse_overwrite([tmp_path / "file", tmp_path / "full"], force=True)
    with pytest.raises(FileExistsError, match="file: exists"), atomic_write.atomic_path(tmp_path / "file", force=False):
        pass
    assert (tmp_path / "file").read_text() == "x"


# ------------------------------------------------------------------------------- best checkpoints


def _tiny_config():
    config = base_config()
    config.model.name = "unet"
    config.model.features = (2, 4, 4)
    config.data.patch_size = (16, 32, 32)
    config.inference.batch_size = 4
    return config


def _state(config, seed):
    from helpers import random_unet_variables

    from livseg_jax.models import build_model

    variables = random_unet_variables(build_model(config.model, deploy=False), tuple(config.data.patch_size), seed)
    return {"step": np.int32(seed), **variables}


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _predict(run, out, which="best"):
    case = write_synthetic_dataset(out.parent / "data", 1, (48, 48, 16), (3.0, 3.0, 3.0), seed=0)[0]
    return predict.main(["--liver", str(run), "--which", which, "-i", str(case.image), "-o", str(out),
                         "--no-progress", "--compilation-cache", "off"])


def test_interrupted_best_save_keeps_the_old_best_and_predict_uses_it(tmp_path, monkeypatch, capsys):
    config = _tiny_config()
    run = tmp_path / "run"
    run_dir.save_config(run, config)
    ckpt = run_dir.RunCheckpoints(run, keep=2)
    old_best, new_best = _state(config, 2), _state(config, 4)
    ckpt.save(2, old_best)
    ckpt.save_best(2, old_best, dice=0.5)

    async def full_disk_at_the_final_rename(*args, **kwargs):
        raise _enospc()

    monkeypatch.setattr(async_path, "rename", full_disk_at_the_final_rename)  # the data is written by then
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_best(4, new_best, dice=0.7)
    monkeypatch.undo()
    ckpt.close()
    assert any(".orbax-checkpoint-tmp" in name for name in _listing(run / "best"))  # the killed save's folder
    assert run_dir.checkpoint_step(run, "best") == (run_dir.BEST, 2)
    assert _same(run_dir.load_variables(run, "best")[0], {k: v for k, v in old_best.items() if k != "step"})
    assert _predict(run, tmp_path / "pred" / "seg.nii.gz") == 0
    assert json.loads((tmp_path / "pred" / "seg_timings.json").read_text())["run"]["settings"]["liver"]["which"] \
        == "best"

    # Killed after best.json names the new checkpoint, before the old one is deleted: the new one counts.
    ckpt = run_dir.RunCheckpoints(run, keep=2)
    monkeypatch.setattr(ckpt.best, "delete", lambda step: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_best(4, new_best, dice=0.7)
    monkeypatch.undo()
    assert run_dir.checkpoint_step(run, "best") == (run_dir.BEST, 4)
    assert _same(run_dir.load_variables(run, "best")[0], {k: v for k, v in new_best.items() if k != "step"})
    ckpt.save_best(6, old_best, dice=0.8)  # a normal save: only the new best is kept, temporaries gone
    ckpt.close()
    assert _listing(run / "best") == ["6"]
    capsys.readouterr()


def test_a_broken_best_is_an_error_never_another_checkpoint(tmp_path, capsys):
    config = _tiny_config()
    run = tmp_path / "run"
    run_dir.save_config(run, config)
    ckpt = run_dir.RunCheckpoints(run, keep=2)
    ckpt.save(4, _state(config, 4))
    ckpt.save_best(2, _state(config, 2), dice=0.5)
    ckpt.close()
    atomic_write.write_json(run / run_dir.BEST_RECORD, {"step": 3, "dice": 0.6})  # names no checkpoint
    with pytest.raises(ValueError, match=r"best/3: the best checkpoint that .*best.json names is missing"):
        run_dir.checkpoint_step(run, "best")
    assert run_dir.checkpoint_step(run, "latest") == (run_dir.PERIODIC, 4)
    out = tmp_path / "pred" / "seg.nii.gz"
    assert _predict(run, out) == 1
    assert "best.json names is missing" in capsys.readouterr().err and not out.exists()
    (run / run_dir.BEST_RECORD).unlink()  # a best checkpoint nothing records as best
    with pytest.raises(ValueError, match=r"best: holds step\(s\) \[2\] but .*best.json is missing"):
        run_dir.checkpoint_step(run, "best")
    (run / run_dir.BEST_RECORD).write_text("{torn")
    with pytest.raises(ValueError, match=r"best.json: unreadable best-checkpoint record"):
        run_dir.checkpoint_step(run, "best")


def test_resume_drops_best_checkpoints_that_best_json_does_not_name(tmp_path):
    config = _tiny_config()
    ckpt = run_dir.RunCheckpoints(tmp_path, keep=2)
    ckpt.save_best(2, _state(config, 2), dice=0.5)
    ckpt.best.save(4, args=ocp.args.StandardSave(_state(config, 4)))
    ckpt.best.wait_until_finished()  # as a run killed before recording it leaves it
    ckpt.forget_after(6)
    assert list(ckpt.best.all_steps()) == [2] and ckpt.best_dice() == 0.5
    ckpt.forget_after(1)  # resuming before the recorded best: it is recomputed
    assert list(ckpt.best.all_steps()) == [] and ckpt.best_dice() == -1.0
    ckpt.close()


# ------------------------------------------------------------------------------- resume


def _saved(tmp_path, config):
    run_dir.save_config(tmp_path, config)
    return (tmp_path / run_dir.CONFIG_FILE).read_text()


@pytest.mark.parametrize("changes, keys", [
    ({"preprocess.hu_min": -100.0, "preprocess.spacing_mode": "target"}, ["preprocess.hu_min",
                                                                          "preprocess.spacing_mode"]),
    ({"stage": "tumor"}, ["stage"]),
    ({"model.name": "resunet", "model.num_classes": 3}, ["model.name", "model.num_classes"]),
    ({"model.features": (4, 8, 8, 8, 8), "model.deep_supervision": False},
     ["model.features", "model.deep_supervision"]),
    ({"data.patch_size": (32, 32, 32)}, ["data.patch_size"]),
    ({"data.liver_margin_mm": 5.0, "seed": 3}, ["data.liver_margin_mm", "seed"]),
])
def test_resume_refuses_meaning_changes_naming_each_key_and_the_run(tmp_path, changes, keys):
    config = _tiny_config()
    _saved(tmp_path, config)
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    with pytest.raises(ValueError) as err:
        run_dir.check_resumable(config, tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path}: ")
    named = [part.split(" (")[0] for part in message.split(": ", 2)[2].split(". They")[0].split("; ")]
    assert named == sorted(keys)


def test_resume_accepts_compute_only_changes(tmp_path):
    config = _tiny_config()
    _saved(tmp_path, config)
    config.data.update(batch_size=8, num_workers=2, prefetch=4, root="/elsewhere")
    config.model.update(dtype="bfloat16", pointwise_impl="einsum", depthwise_impl="shift", dropout=0.1)
    config.train.update(num_epochs=99, log_every_steps=5, checkpoint_every_epochs=3, xla_flags="--x=1")
    config.optim.learning_rate = 3e-4
    config.inference.overlap = 0.25
    run_dir.check_resumable(config, tmp_path)


def test_train_refuses_changed_preprocessing_keeping_config_json_and_resumes_after_a_compute_change(tmp_path):
    from test_training import tiny_config

    from livseg_jax.training.loop import train_and_evaluate

    cache_dir, run = tmp_path / "cache", tmp_path / "run"
    devices = jax.devices()[:1]
    config = tiny_config(cache_dir, num_epochs=1, steps_per_epoch=1)
    config.data.batch_size = 2
    train_and_evaluate(config, run, devices=devices)
    before = (run / run_dir.CONFIG_FILE).read_text()
    changed = tiny_config(cache_dir, num_epochs=2, steps_per_epoch=1)
    changed.preprocess.hu_max = 300.0
    with pytest.raises(ValueError, match=rf"{run}: .*preprocess.hu_max \(200.0 -> 300.0\)"):
        train_and_evaluate(changed, run, devices=devices)
    assert (run / run_dir.CONFIG_FILE).read_text() == before
    compute = tiny_config(cache_dir, num_epochs=2, steps_per_epoch=1)
    compute.data.batch_size = 1
    summary = train_and_evaluate(compute, run, devices=devices)
    assert summary["start_step"] == 1 and summary["final_step"] == 2
    assert run_dir.load_config(run).data.batch_size == 1


def test_resume_takes_keys_missing_from_an_older_config_json_as_their_defaults(tmp_path):
    config = _tiny_config()
    saved = config.to_dict()
    del saved["preprocess"]["spacing_mode"], saved["data"]["liver_margin_mm"]  # as older versions wrote
    (tmp_path / run_dir.CONFIG_FILE).write_text(json.dumps(saved, default=list))
    run_dir.check_resumable(config, tmp_path)
    config.data.liver_margin_mm = 4.0
    with pytest.raises(ValueError, match=r"data.liver_margin_mm \(10.0 -> 4.0\)"):
        run_dir.check_resumable(config, tmp_path)


IMPORTER_STALLING_AFTER_THE_LABELS = """
import pathlib, sys, time
from livseg_jax.data import ircadb
real_save = ircadb.save_nifti
def stall_after_first(img, path, calls=[]):
    real_save(img, path)
    calls.append(path)
    if len(calls) == 1:
        print(path, flush=True)
        time.sleep(60)
ircadb.save_nifti = stall_after_first
sys.exit(ircadb.main(sys.argv[1:]))
"""


def test_sigterm_stops_the_importer_cli_with_no_half_case_and_no_temporary(tmp_path):
    pytest.importorskip("pydicom")
    from test_ircadb import _make_patient

    patient = _make_patient(tmp_path / "3Dircadb1.5", zipped=True)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", IMPORTER_STALLING_AFTER_THE_LABELS, str(patient), str(out)],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    written = pathlib.Path(proc.stdout.readline().strip())
    assert written.is_file() and written.name.startswith(".segmentation-5.nii.gz."), proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert _listing(out) == []


# ------------------------------------------------------------------ a signal during a compile


def test_sigterm_while_the_step_compiles_in_the_background_waits_for_it_and_exits_cleanly(tmp_path):
    # A process that exits while XLA compiles on another thread aborts ("terminate called ...",
    # status 134). train's compile thread is not a daemon and the unwinding waits for it, saying so.
    env = {**ENV, "LIVSEG_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "livseg_jax.train", "--config=configs/liver.py", f"--workdir={tmp_path / 'run'}",
           "--config.data.synthetic.num_cases=3", "--config.data.num_val_cases=1", "--config.train.num_epochs=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "initialising the model" in line:  # the step's compile is under way, the state's about to be
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 128 + signal.SIGTERM, "".join(seen)
    out = "".join(seen) + proc.stdout.read()
    assert "compile to finish before stopping" in out
    assert "terminate called" not in out and "Traceback" not in out and "Exception ignored" not in out
    temporaries = [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert temporaries == []
    assert not list((tmp_path / "run").glob("checkpoints*/*"))  # stopped before any step


def test_sigterm_inside_a_collector_callback_is_sent_again_not_lost(monkeypatch):
    # Python drops an exception raised in a garbage-collector callback (JAX installs one), so a
    # SIGTERM handled there would be lost; the handler sends it again once the callback is over.
    frames = []

    def callback(phase, info):
        if not frames:
            frames.append(sys._getframe())

    sent = []
    monkeypatch.setattr(atomic_write.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    import gc

    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
        gc.callbacks.append(callback)  # still registered while the handler looks at the frame
    try:
        atomic_write._raise_terminated(signal.SIGTERM, frames[0])  # no raise: it would be dropped
        deadline = time.time() + 5
        while not sent and time.time() < deadline:
            time.sleep(0.01)
    finally:
        gc.callbacks.remove(callback)
    assert sent == [(os.getpid(), signal.SIGTERM)]
    with pytest.raises(atomic_write.Terminated):  # anywhere else it raises at once
        atomic_write._raise_terminated(signal.SIGTERM, sys._getframe())
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C's handler the same way
        atomic_write._raise_interrupt(signal.SIGINT, sys._getframe())
