"""ONNX and StableHLO export (convert --to-onnx / --to-stablehlo) and predict --backend onnxruntime.

Tiny networks (two widths (4, 8), ResUNet++ its minimum of three), 16^3 windows, float32, CPU.
"Relative" is max |difference| / max |reference|. Batch 2 is exported and batch 1 and 3 are run,
which is what a dynamic batch axis must allow.
"""

import json
import subprocess
import sys

import jax
import ml_collections
import nibabel as nib
import numpy as np
import pytest

from livseg_jax import convert, predict
from livseg_jax.config import base_config, model_config
from livseg_jax.inference import backends
from livseg_jax.inference.two_stage import load_stage_model
from livseg_jax.interop import mapping
from livseg_jax.models import NETWORKS, build_model, reparameterize
from livseg_jax.models.forms import REFERENCE_FORMS
from livseg_jax.run_dir import RunCheckpoints, load_variables, save_config
from tools import parity

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
torch.set_num_threads(2)

WINDOW = (16, 16, 16)
TOL = 1e-4


def tiny_model(name: str) -> ml_collections.ConfigDict:
    """Returns the model section of `name` at the smallest widths it allows, reference forms."""
    cfg = model_config(name)
    cfg.features = (4, 8, 8) if name == "resunet_pp" else (4, 8)
    cfg.update(REFERENCE_FORMS)
    if name == "unet3plus":
        cfg.cat_channels = 4
    return cfg


def windows(batch: int, seed: int = 0) -> np.ndarray:
    """Returns N(0, 1) float32 windows (batch, 16, 16, 16, 1)."""
    return np.random.default_rng(seed).normal(size=(batch, *WINDOW, 1)).astype(np.float32)


def rel(reference, other) -> float:
    """Returns max |reference - other| / max |reference|."""
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    return float(np.abs(reference - other).max() / np.abs(reference).max())


def deploy_logits(variables, model_cfg, x, deploy: bool = True) -> np.ndarray:
    """Returns JAX's evaluation output of the deploy-form (or the training-form) network on `x`."""
    model = build_model(model_cfg, deploy=deploy)
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


# The networks of the two run directories below, exported through the CLI and checked there; every
# other network of NETWORKS is exported and checked by the parametrised test.
RUN_NETWORKS = {"liver": "elanres_msca_unet", "tumor": "unet"}


@pytest.mark.parametrize("name", sorted(set(NETWORKS) - set(RUN_NETWORKS.values())))
def test_onnx_runtime_equals_jax_deploy_for_every_network(name, tmp_path):
    from livseg_jax.interop import onnx_export

    cfg = tiny_model(name)
    variables = reparameterize(parity.random_flax_variables(mapping.flax_variable_shapes(cfg, deploy=False), 1))
    path = onnx_export.export_onnx(variables, cfg, WINDOW, tmp_path / "m.onnx", {"k": "v"})
    assert onnx_export.read_metadata(path) == {"k": "v"}
    session = backends.onnx_session(path, ["CPUExecutionProvider"])
    x = windows(3)
    reference = deploy_logits(variables, cfg, x)
    for batch in (1, 3):  # exported with a batch of 2
        out = session.run(None, {onnx_export.INPUT_NAME: x[:batch]})[0]
        assert out.shape == reference[:batch].shape
        assert rel(reference[:batch], out) < TOL, name


def test_axial_form_has_no_twin_and_is_refused():
    from livseg_jax.interop import onnx_export

    cfg = tiny_model("unet")
    cfg.spatial_dims = 2
    with pytest.raises(ValueError, match="spatial_dims = 2.*--to-stablehlo"):
        onnx_export.check_exportable(cfg)


def write_run(workdir, stage, name="elanres_msca_unet", seed=0, **preprocess):
    """Writes a training-form run directory of a tiny random network (16^3 windows); returns it."""
    c = base_config()
    c.stage = stage
    c.model = tiny_model(name)
    c.model.num_classes = 2
    c.data.patch_size = WINDOW
    c.inference.overlap = 0.25
    c.preprocess.update(preprocess)
    variables = parity.random_flax_variables(mapping.flax_variable_shapes(c.model, deploy=False), seed)
    save_config(workdir, c)
    ckpt = RunCheckpoints(workdir, keep=1)
    ckpt.save(1, {"step": np.int32(1), **variables})
    ckpt.close()
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A liver and a tumour run (training form, coarse preprocessing) and their ONNX exports."""
    root = tmp_path_factory.mktemp("export_runs")
    pre = dict(inplane_factor=8, target_slice_spacing=4.8)
    liver = write_run(root / "liver", "liver", RUN_NETWORKS["liver"], 0, **pre)
    tumor = write_run(root / "tumor", "tumor", RUN_NETWORKS["tumor"], 1, **pre)
    for run in (liver, tumor):
        assert convert.main(["--to-onnx", str(run), "--out", str(root / f"{run.name}.onnx")]) == 0
    return {"liver": liver, "tumor": tumor, "liver.onnx": root / "liver.onnx", "tumor.onnx": root / "tumor.onnx"}


@pytest.mark.parametrize("stage", sorted(RUN_NETWORKS))
def test_training_form_run_is_reparameterised_on_export(runs, stage):
    variables, config = load_variables(runs[stage])
    assert "batch_stats" in variables and config.model.name == RUN_NETWORKS[stage]  # a training-form run
    x = windows(3, seed=3)
    reference = deploy_logits(reparameterize(variables), config.model, x)
    evaluated = deploy_logits(variables, config.model, x, deploy=False)
    session = backends.onnx_session(runs[f"{stage}.onnx"], ["CPUExecutionProvider"])
    for batch in (1, 3):  # exported with a batch of 2
        out = session.run(None, {"image": x[:batch]})[0]
        assert rel(reference[:batch], out) < TOL
        assert rel(evaluated[:batch], out) < TOL  # the folded network computes what the trained one does


def test_onnx_metadata_and_existing_output(runs, capsys):
    from livseg_jax.interop.onnx_export import read_metadata

    meta = read_metadata(runs["liver.onnx"])
    assert json.loads(meta[backends.WINDOW_KEY]) == list(WINDOW)
    assert json.loads(meta[backends.CONFIG_KEY])["model"]["deploy"] is True
    # An existing output is refused without --force, naming it.
    assert convert.main(["--to-onnx", str(runs["liver"]), "--out", str(runs["liver.onnx"])]) == 1
    assert f"error: {runs['liver.onnx']}: exists" in capsys.readouterr().err


def test_onnx_window_fn_with_mirror_equals_the_jax_one(runs):
    tumor_jax = load_stage_model(runs["tumor"], "tumor", mirror=True)
    tumor_onnx = backends.load_onnx_stage_model(runs["tumor.onnx"], "tumor", mirror=True,
                                                providers=["CPUExecutionProvider"])
    x = windows(2, seed=4)
    reference = np.asarray(tumor_jax.window_fn(tumor_jax.variables, x))
    out = tumor_onnx.window_fn(tumor_onnx.variables, x)
    assert np.abs(reference - out).max() < 1e-5
    # The settings come from the .onnx file's metadata alone, and are those of the run.
    # (the JAX computation forms have no ONNX counterpart)
    settings = {k: v for k, v in tumor_jax.settings().items() if k not in ("source", "which", "forms")}
    assert {k: tumor_onnx.settings()[k] for k in settings if k in tumor_onnx.settings()} == settings
    assert tumor_onnx.preprocessing == tumor_jax.preprocessing
    assert tumor_onnx.liver_margin_mm == tumor_jax.liver_margin_mm
    # No CPU arena: each session would keep its peak activations reserved (docs/benchmarks.md).
    assert tumor_onnx.variables.get_session_options().enable_cpu_mem_arena is False


def test_predict_onnxruntime_equals_the_jax_backend(runs, tmp_path, capsys):
    rng = np.random.default_rng(0)
    ct = rng.normal(-200, 300, (96, 96, 20)).astype(np.float32)  # (x, y, z) on disk
    ct[24:72, 24:72, 4:16] = rng.normal(60, 20, (48, 48, 12))  # a soft-tissue block
    nib.save(nib.Nifti1Image(ct, np.diag([1.5, 1.5, 2.5, 1.0])), tmp_path / "volume-0.nii.gz")
    labels = {}
    for backend, liver, tumor in (("jax", runs["liver"], runs["tumor"]),
                                  ("onnxruntime", runs["liver.onnx"], runs["tumor.onnx"]),
                                  ("auto", runs["liver.onnx"], runs["tumor.onnx"])):  # .onnx files: ONNX Runtime
        out = tmp_path / backend
        argv = ["--backend", backend, "--liver", str(liver), "--tumor", str(tumor), "-i",
                str(tmp_path / "volume-0.nii.gz"), "-o", str(out), "--no-progress", "--compilation-cache", "off"]
        assert predict.main(argv) == 0, capsys.readouterr().err
        labels[backend] = np.asarray(nib.load(out / "segmentation-0.nii.gz").dataobj)
        record = json.loads((out / "segmentation-0_timings.json").read_text())
        assert record["run"]["settings"]["liver"]["source"] == str(liver)
    assert labels["jax"].any()  # the comparison is not between two empty maps
    np.testing.assert_array_equal(labels["onnxruntime"], labels["jax"])
    np.testing.assert_array_equal(labels["auto"], labels["jax"])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    argv = ["--backend", "onnxruntime", "--liver", str(garbage), "-i", str(tmp_path / "volume-0.nii.gz"),
            "-o", str(tmp_path / "bad"), "--no-progress", "--compilation-cache", "off"]
    assert predict.main(argv) == 1
    assert f"error: {garbage}: not a readable ONNX model" in capsys.readouterr().err


def test_auto_backend_exports_run_directories_once_and_runs_them_in_onnxruntime(runs, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setenv("LIVSEG_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    ct = rng.normal(-200, 300, (96, 96, 20)).astype(np.float32)
    ct[24:72, 24:72, 4:16] = rng.normal(60, 20, (48, 48, 12))
    nib.save(nib.Nifti1Image(ct, np.diag([1.5, 1.5, 2.5, 1.0])), tmp_path / "volume-0.nii.gz")
    labels, printed = {}, {}
    for name, backend in (("jax", "jax"), ("auto1", "auto"), ("auto2", "auto")):
        out = tmp_path / name
        argv = ["--backend", backend, "--liver", str(runs["liver"]), "--tumor", str(runs["tumor"]), "-i",
                str(tmp_path / "volume-0.nii.gz"), "-o", str(out), "--no-progress", "--compilation-cache", "off"]
        assert predict.main(argv) == 0, capsys.readouterr().err
        printed[name] = capsys.readouterr().out
        labels[name] = np.asarray(nib.load(out / "segmentation-0.nii.gz").dataobj)
        settings = json.loads((out / "segmentation-0_timings.json").read_text())["run"]["settings"]
        assert (settings["liver"].get("backend") == "onnxruntime") == (name != "jax")
    assert "prediction backend on this CPU: onnxruntime" in printed["auto1"]
    assert printed["auto1"].count("exporting ") == 2 and "exporting " not in printed["auto2"]  # cached
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 2
    assert labels["jax"].any()
    np.testing.assert_array_equal(labels["auto1"], labels["jax"])
    np.testing.assert_array_equal(labels["auto2"], labels["jax"])


def test_the_export_cache_key_follows_the_weights_not_the_logs(runs, tmp_path):
    import shutil

    from livseg_jax.inference.onnx_cache import run_fingerprint

    run = tmp_path / "run"
    shutil.copytree(runs["liver"], run)
    key = run_fingerprint(run, "best")
    (run / "metrics.jsonl").open("a").write('{"step": 99}\n')
    assert run_fingerprint(run, "best") == key
    assert run_fingerprint(run, "latest") != key
    weights = next(p for p in sorted(run.rglob("*")) if p.is_file() and p.suffix not in (".json", ".jsonl", ".png"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert run_fingerprint(run, "best") != key


def test_stablehlo_reloads_in_a_fresh_process_without_the_model_code(runs, tmp_path):
    out = tmp_path / "liver.stablehlo"
    assert convert.main(["--to-stablehlo", str(runs["liver"]), "--out", str(out), "--platforms", "cpu"]) == 0
    assert (tmp_path / "liver.stablehlo.mlirbc").stat().st_size > 0  # the bare module, for PJRT servers
    meta = json.loads((tmp_path / "liver.stablehlo.json").read_text())
    assert meta["input"] == "float32[b,16,16,16,1]" and meta["platforms"] == ["cpu"]
    assert json.loads(meta[backends.WINDOW_KEY]) == list(WINDOW)
    x = windows(3, seed=5)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, jax\n"
        f"exported = jax.export.deserialize(open({str(out)!r}, 'rb').read())\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"np.save({str(tmp_path / 'y1.npy')!r}, np.asarray(exported.call(x[:1])))\n"
        f"np.save({str(tmp_path / 'y3.npy')!r}, np.asarray(exported.call(x)))\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('livseg_jax'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    variables, config = load_variables(runs["liver"])
    reference = deploy_logits(reparameterize(variables), config.model, x)
    assert rel(reference[:1], np.load(tmp_path / "y1.npy")) < TOL
    assert rel(reference, np.load(tmp_path / "y3.npy")) < TOL


def test_stablehlo_exports_the_axial_form_that_onnx_cannot():
    from livseg_jax.interop import stablehlo_export

    cfg = tiny_model("unet")
    cfg.spatial_dims = 2
    variables = reparameterize(parity.random_flax_variables(mapping.flax_variable_shapes(cfg, deploy=False), 3))
    exported = stablehlo_export.export_deploy_forward(variables, cfg, WINDOW, ("cpu",))
    x = windows(3, seed=6)
    assert rel(deploy_logits(variables, cfg, x), exported.call(x)) < TOL


def test_stablehlo_static_batch_when_asked():
    from livseg_jax.interop import stablehlo_export

    cfg = tiny_model("unet")
    variables = reparameterize(parity.random_flax_variables(mapping.flax_variable_shapes(cfg, deploy=False), 2))
    exported = stablehlo_export.export_deploy_forward(variables, cfg, WINDOW, ("cpu",), batch=2)
    assert exported.in_avals[0].shape == (2, *WINDOW, 1)
    with pytest.raises(ValueError, match="re-parameterised"):
        stablehlo_export.export_deploy_forward(parity.random_flax_variables(
            mapping.flax_variable_shapes(cfg, deploy=False), 2), cfg, WINDOW)


def test_export_flag_errors_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    for window, message in (("a,b", "--window: expected three positive integers D,H,W"),
                            ("16,16", "--window: expected three positive integers D,H,W"),
                            ("15,16,16", "inference window (15, 16, 16)")):
        assert convert.main(["--to-onnx", str(runs["tumor"]), "--out", str(out), "--window", window]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert convert.main(["--to-onnx", str(runs["tumor"]), "--to-stablehlo", str(runs["tumor"]), "--out", str(out)]) == 1
    assert "give exactly one of" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
