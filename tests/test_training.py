"""Training: data parallelism, exact resume, config overrides, NaN guard, checkpoints."""

import contextlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livseg_jax import losses
from livseg_jax.config import base_config
from livseg_jax.run_dir import load_variables, write_variables
from livseg_jax.training import logging as run_logging
from livseg_jax.training import loop
from livseg_jax.training.loop import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny_config(cache_dir, **train):
    c = base_config()
    c.model.name = "unet"
    c.model.features = (4, 8, 8)  # three levels: what the loop does is the same, the compile half of five
    c.data.synthetic.num_cases = 3
    c.data.synthetic.shape = (96, 96, 32)
    c.data.synthetic.spacing = (2.0, 2.0, 4.0)
    c.data.num_val_cases = 1
    c.data.patch_size = (16, 32, 32)
    c.data.batch_size = 8
    c.data.cache_dir = str(cache_dir)
    c.train.update(dict(num_epochs=2, steps_per_epoch=2, log_every_steps=1, eval_every_epochs=0))
    c.train.update(train)
    return c


def max_rel_diff(a, b):
    def rel(x, y):
        x, y = np.asarray(x), np.asarray(y)
        return float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))

    return max(jax.tree.leaves(jax.tree.map(rel, a, b)))


def train_losses(workdir):
    return {r["step"]: r["loss"] for r in run_logging.read_metrics(workdir) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run_8dev")
    summary = train_and_evaluate(tiny_config(cache_dir), workdir)
    return workdir, summary


def test_one_device_and_eight_devices_train_the_same(cache_dir, tmp_path, uninterrupted):
    assert len(jax.devices()) == 8
    workdir8, summary8 = uninterrupted
    summary1 = train_and_evaluate(tiny_config(cache_dir), tmp_path, devices=jax.devices()[:1])
    losses1, losses8 = train_losses(tmp_path), train_losses(workdir8)
    assert sorted(losses1) == [1, 2, 3, 4]
    np.testing.assert_allclose([losses1[s] for s in sorted(losses1)], [losses8[s] for s in sorted(losses8)],
                               rtol=1e-5)
    assert max_rel_diff(summary1["state"].params, summary8["state"].params) <= 1e-5
    assert max_rel_diff(summary1["state"].batch_stats, summary8["state"].batch_stats) <= 1e-5
    # The 8-device state really is laid out over 8 devices.
    leaf = jax.tree.leaves(summary8["state"].params)[0]
    assert len(leaf.sharding.device_set) == 8


def test_killed_run_resumes_to_the_same_result(cache_dir, tmp_path, uninterrupted, monkeypatch):
    workdir_ref, summary_ref = uninterrupted
    original_write = run_logging.MetricWriter.write

    def write_then_die(self, step, kind, values):
        original_write(self, step, kind, values)
        if step == 3:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(run_logging.MetricWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(tiny_config(cache_dir), tmp_path)
    monkeypatch.undo()
    # A save that was interrupted leaves an orbax temporary folder; it must be ignored.
    junk = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-123"
    junk.mkdir()
    (junk / "partial").write_bytes(b"\0" * 10)

    summary = train_and_evaluate(tiny_config(cache_dir), tmp_path)
    assert summary["start_step"] == 2  # the last complete checkpoint (end of epoch 1)
    assert max_rel_diff(summary["state"].params, summary_ref["state"].params) <= 1e-6
    assert train_losses(tmp_path) == pytest.approx(train_losses(workdir_ref), rel=1e-6)


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_last_good_checkpoint(cache_dir, tmp_path,
                                                                                monkeypatch):
    real = losses.deep_supervision_loss

    def nan_from_epoch_two(logits_list, labels, loss_config, ds_alpha):
        total, per_head = real(logits_list, labels, loss_config, ds_alpha)
        # ds_alpha halves every epoch here, so this turns NaN exactly from epoch 2 (step 3) on.
        return jnp.where(ds_alpha < 0.3, jnp.nan, total), per_head

    monkeypatch.setattr(losses, "deep_supervision_loss", nan_from_epoch_two)
    config = tiny_config(cache_dir)
    config.loss.ds_decay = 0.5
    config.loss.ds_decay_every_epochs = 1
    with pytest.raises(FloatingPointError, match=r"at step 3.*Last good checkpoint: step 2"):
        train_and_evaluate(config, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]
    variables, _ = load_variables(tmp_path, which="latest")
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


def test_validation_keeps_the_best_checkpoint_and_writes_curves(cache_dir, tmp_path):
    config = tiny_config(cache_dir, num_epochs=2, eval_every_epochs=1)
    config.data.batch_size = 2
    summary = train_and_evaluate(config, tmp_path, devices=jax.devices()[:2])
    vals = [r for r in run_logging.read_metrics(tmp_path) if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [2, 4]
    assert all(0.0 <= r["dice"] <= 1.0 for r in vals)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["dice"] == pytest.approx(max(r["dice"] for r in vals))
    assert best["step"] == max(vals, key=lambda r: r["dice"])["step"]
    assert summary["best_dice"] == pytest.approx(best["dice"])
    assert (tmp_path / "curves.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["eval_every_epochs"] == 1
    train = [r for r in run_logging.read_metrics(tmp_path) if r["kind"] == "train"]
    assert all({"learning_rate", "ds_alpha", "loss", "steps_per_sec"} <= r.keys() for r in train)


def test_batch_that_does_not_divide_by_the_devices_is_an_error(cache_dir, tmp_path):
    config = tiny_config(cache_dir)
    config.data.batch_size = 6
    with pytest.raises(ValueError, match="does not divide by the 8 devices"):
        train_and_evaluate(config, tmp_path)


def run_cli(*args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "livseg_jax.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def test_command_line_overrides_reach_the_run_and_unknown_keys_fail(cache_dir, tmp_path):
    common = [f"--config={REPO / 'configs' / 'tumor.py'}", f"--workdir={tmp_path / 'run'}",
              f"--config.data.cache_dir={cache_dir}", "--config.data.synthetic.num_cases=3",
              "--config.data.synthetic.shape=(96,96,32)", "--config.train.num_epochs=0",
              "--config.model.name=unet", "--config.model.features=(4,8,8,8,8)"]
    ok = run_cli(*common, "--config.optim.learning_rate=0.003", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optim"]["learning_rate"] == 0.003 and saved["stage"] == "tumor"
    bad = run_cli(*common, "--config.optim.no_such_key=1", cwd=tmp_path)
    assert bad.returncode != 0 and "no_such_key" in bad.stderr


def test_tumor_stage_can_crop_with_stage1_liver_predictions(cache_dir, tmp_path):
    from livseg_jax.models import build_model
    from livseg_jax.training.loop import prepare_stage_cases

    liver_config = tiny_config(cache_dir)
    shapes = jax.eval_shape(lambda: build_model(liver_config.model).init(
        jax.random.key(0), jnp.zeros((1, 16, 32, 32, 1)), train=True))
    variables = jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype), shapes)
    for bias, name in (([-20.0, 20.0], "everywhere"), ([20.0, -20.0], "nowhere")):
        finest = f"head{len(liver_config.model.features) - 2}"  # the evaluation map's head
        variables["params"][finest]["bias"] = np.array(bias, np.float32)
        write_variables(tmp_path / name, variables, liver_config)

    config = tiny_config(cache_dir)
    config.stage = "tumor"
    config.data.tumor_crop_source = "stage1"
    config.data.stage1_run = str(tmp_path / "everywhere")
    train, val = prepare_stage_cases(config)
    reference_train, _ = prepare_stage_cases(_tumor_gt_config(cache_dir))
    # A "liver everywhere" stage-1 model crops nothing away; the reference liver crops tighter.
    for case, ref in zip(train, reference_train, strict=True):
        assert all(a >= b for a, b in zip(case.shape, ref.shape, strict=True))
        assert case.shape != ref.shape
    config.data.stage1_run = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="stage-1 model found no liver"):
        prepare_stage_cases(config)


def _tumor_gt_config(cache_dir):
    config = tiny_config(cache_dir)
    config.stage = "tumor"
    return config


def test_resuming_with_a_different_model_is_refused_and_keeps_config(cache_dir, tmp_path, monkeypatch):
    config = tiny_config(cache_dir, num_epochs=1)
    train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
    before = (tmp_path / "config.json").read_text()
    changed = tiny_config(cache_dir, num_epochs=2)
    changed.model.features = (4, 8, 8, 8, 16)
    compiles = []
    monkeypatch.setattr(loop, "compile_ahead", lambda *a, **k: compiles.append(k["name"]))
    with pytest.raises(ValueError, match="other settings.*model"):
        train_and_evaluate(changed, tmp_path, devices=jax.devices()[:1])
    assert (tmp_path / "config.json").read_text() == before
    assert compiles == []  # refused before any compile starts (it could take minutes to stop)


def test_torn_metrics_line_does_not_block_resume(tmp_path):
    writer = run_logging.MetricWriter(tmp_path)
    writer.write(1, "train", {"loss": 1.0})
    writer.write(2, "train", {"loss": 0.5})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "kind": "tra')
    writer.truncate_after(1)
    assert [r["step"] for r in run_logging.read_metrics(tmp_path)] == [1]


def test_step_without_donation_keeps_its_input_and_computes_the_same_update():
    from livseg_jax.models import build_model
    from livseg_jax.training.schedules import make_optimizer
    from livseg_jax.training.state import create_train_state
    from livseg_jax.training.step import jit_train_step, make_mesh, make_train_step, replicated

    c = base_config()
    c.model.name, c.model.features = "unet", (2, 4, 4, 4, 4)
    model, optimizer, mesh = build_model(c.model), make_optimizer(c.optim, 10), make_mesh(jax.devices()[:1])
    init = jax.jit(lambda: create_train_state(model, optimizer, 0), out_shardings=replicated(mesh))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(2, 16, 16, 16, 1)), jnp.float32),
             "label": jnp.asarray(rng.random((2, 16, 16, 16)) < 0.3, jnp.int32)}
    step = make_train_step(model, optimizer, c.loss, 10)
    # Bit for bit under XLA:CPU's default code generation, which users run; the suite's loop emitters
    # (conftest.py) round the two programs differently (1.7e-6 relative, session 17).
    def run(donate: bool, state):
        jitted = jit_train_step(step, mesh, donate_state=donate)  # lowering reads only types, not values
        return jitted.lower(state, batch).compile(compiler_options={"xla_cpu_use_fusion_emitters": True})(state, batch)

    kept = init()
    new_kept, _ = run(False, kept)
    donated = init()
    new_donated, _ = run(True, donated)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(kept))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(donated.params))
    assert max_rel_diff(new_kept.params, new_donated.params) == 0.0
    assert max_rel_diff(new_kept.params, kept.params) > 0  # the step did change the parameters


def test_resume_accepts_a_run_saved_before_a_model_key_existed_and_refuses_a_changed_value(tmp_path):
    from livseg_jax.training.loop import check_resumable

    config = base_config()
    saved = config.to_dict()
    del saved["model"]["pointwise_impl"]  # as written before the key was added
    (tmp_path / "config.json").write_text(json.dumps(saved, default=list))
    check_resumable(config, tmp_path)  # the default value is what the old run used
    del saved["model"]["n_rep"]
    (tmp_path / "config.json").write_text(json.dumps(saved, default=list))
    config.model.n_rep = 3  # not the default the old run had: another parameter tree
    with pytest.raises(ValueError, match="model"):
        check_resumable(config, tmp_path)


def test_resume_accepts_another_implementation_of_the_same_parameters(tmp_path):
    from livseg_jax.training.loop import check_resumable

    config = base_config()
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict(), default=list))
    config.model.update(dtype="bfloat16", depthwise_impl="shift", pointwise_impl="einsum")
    check_resumable(config, tmp_path)
    config.model.features = (8, 16, 32, 64, 128)
    with pytest.raises(ValueError, match="model"):
        check_resumable(config, tmp_path)


@pytest.mark.parametrize("ahead", [True, False])
def test_the_step_compiles_ahead_and_the_bar_starts_once_it_is_ready(cache_dir, tmp_path, monkeypatch, capsys,
                                                                     ahead):
    # The step compiles on a background thread from the config's shapes while the state is made
    # (train.compile_ahead=False: at the first step); every step runs that program, and a bar made
    # before it is ready would count compiling in its rate and ETA.
    events, jobs = [], {}
    real_compile_ahead = loop.compile_ahead

    class RecordingJob:
        def __init__(self, job):
            self.job, self.seconds, self.loaded = job, None, None
            self.lowered = job.lowered

        def result(self):
            compiled = self.job.result()
            self.seconds, self.loaded = self.job.seconds, self.job.loaded
            events.append("compiled")

            def step(*a):
                events.append("step")
                return compiled(*a)

            return step

        def release_store(self):  # the compiled-program cache's write, deferred past the first step
            events.append("store released")
            self.job.release_store()

    @contextlib.contextmanager
    def recording_compile_ahead(*args, **kwargs):
        if kwargs["name"] == "initialisation":  # traced with the threefry kernel (off GPUs: no effect)
            events.append(f"initialisation within {kwargs['within'].__name__}")
            # Started once the step is lowered (ahead), so that the two do not trace side by side.
            assert not ahead or jobs["train step"].lowered.is_set()
        with real_compile_ahead(*args, **kwargs) as job:
            jobs[kwargs["name"]] = job
            yield RecordingJob(job) if kwargs["name"] == "train step" else job

    real_bar = loop.tqdm.tqdm

    def recording_bar(*args, **kwargs):
        if kwargs.get("desc", "").startswith("train"):  # tqdm is one module: preprocessing's bar too
            events.append(f"bar from {kwargs['initial']}")
        return real_bar(*args, **kwargs)

    monkeypatch.setattr(loop, "compile_ahead", recording_compile_ahead)
    monkeypatch.setattr(loop.tqdm, "tqdm", recording_bar)
    summary = train_and_evaluate(tiny_config(cache_dir, num_epochs=1, compile_ahead=ahead), tmp_path,
                                 devices=jax.devices()[:1])
    assert events == ["initialisation within init_lowering", "compiled", "bar from 0", "step", "store released", "step"]
    assert 0 <= summary["train_step_wait_s"] <= summary["train_step_compile_s"]
    assert summary["first_step_s"] >= summary["train_step_wait_s"]
    out = capsys.readouterr().out
    assert f"compiling the train step {'in the background' if ahead else 'now'}" in out


def test_initialisation_lowers_threefry_to_the_gpu_kernel_and_the_step_does_not():
    # On GPUs the initialisation's random bits come from JAX's threefry CUDA kernel (one call per
    # variable: far less to compile than unrolled hashing, the same bits); the setting is scoped,
    # so the train step lowers as before. Lowered for CUDA here, without a GPU.
    from livseg_jax.models import build_model
    from livseg_jax.training.schedules import make_optimizer
    from livseg_jax.training.state import init_lowering, jit_create_train_state

    c = base_config()
    c.model.name, c.model.features = "unet", (2, 4, 4, 4, 4)
    model, optimizer = build_model(c.model), make_optimizer(c.optim, 10)

    def cuda_text() -> str:
        return jit_create_train_state(model, optimizer, 3).trace().lower(lowering_platforms=("cuda",)).as_text()

    with init_lowering():
        kernel = cuda_text()
    unrolled = cuda_text()  # outside the context: JAX's default lowering
    assert "cu_threefry2x32" in kernel and "cu_threefry2x32" not in unrolled
    assert kernel.count("stablehlo.shift_left") < unrolled.count("stablehlo.shift_left")  # the rotations are gone


def test_unoptimised_initialisation_program_gives_the_optimised_programs_state():
    # train compiles the initialisation at XLA backend level 0 (it runs once; compiling is its cost):
    # same structure, the step counter and key exact, every float within 2 units in the last place.
    from livseg_jax.models import build_model
    from livseg_jax.training.schedules import make_optimizer
    from livseg_jax.training.state import create_train_state, initial_train_state

    c = base_config()
    c.model.name, c.model.features = "unet", (2, 4, 4, 4, 4)
    model, optimizer = build_model(c.model), make_optimizer(c.optim, 10)
    fast = initial_train_state(model, optimizer, 3)
    reference = jax.jit(lambda: create_train_state(model, optimizer, 3))()
    assert jax.tree.structure(fast) == jax.tree.structure(reference)
    np.testing.assert_array_equal(fast.rng, reference.rng)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(reference), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=2)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(np.asarray(a).std() > 0 for a in jax.tree.leaves(fast.params))  # random, not all zeros


def test_a_second_run_loads_the_compiled_step_and_trains_bit_for_bit_the_same(cache_dir, tmp_path, monkeypatch):
    # With JAX's persistent cache on (train turns it on), the compiled step is also kept whole and
    # a later run of the same config loads it without tracing (training/executable_cache.py).
    monkeypatch.setattr(loop, "executable_cache_dir", lambda: tmp_path / "executables")
    config = tiny_config(cache_dir, num_epochs=1)
    first = train_and_evaluate(config, tmp_path / "a", devices=jax.devices()[:1])
    assert not first["train_step_loaded"] and len(list((tmp_path / "executables").glob("train_step-*.pkl"))) == 1
    assert len(list((tmp_path / "executables").glob("initialisation-*.pkl"))) == 1
    second = train_and_evaluate(tiny_config(cache_dir, num_epochs=1), tmp_path / "b", devices=jax.devices()[:1])
    assert second["train_step_loaded"] and second["initialisation_loaded"] and not first["initialisation_loaded"]
    jax.tree.map(np.testing.assert_array_equal, second["state"], first["state"])
    other = train_and_evaluate(tiny_config(cache_dir, num_epochs=1, steps_per_epoch=3), tmp_path / "c",
                               devices=jax.devices()[:1])
    assert not other["train_step_loaded"]  # another schedule, another program


def test_gradient_norm_from_one_concatenation_is_optax_tree_norm():
    """training.step.global_norm (the step's `grad_norm` metric) against optax's per-leaf norm,
    with float32 and bf16 leaves, a scalar, and an empty array among them."""
    import optax

    from livseg_jax.training.step import global_norm

    rng = np.random.default_rng(5)
    tree = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": [jnp.float32(2.5), jnp.zeros((0, 3))],
            "c": {"d": jnp.asarray(rng.normal(size=17) * 100, jnp.bfloat16)}}
    got = global_norm(tree)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), float(optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32),
                                                                              tree))), rtol=1e-6)
    assert float(global_norm({})) == float(optax.tree.norm({})) == 0.0
