"""The README's newcomer path (install, both demo stages, a predicted phantom with its PNG) runs as written.

`tools/newcomer_path.py` reads the commands from README.md's blocks marked `<!-- newcomer-path -->`
and runs them in a fresh copy of the checkout with an empty HOME and LIVSEG_TINY=1; the unit tests
below check its reading of the README and its check of what was written where.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from tools import newcomer_path

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_blocks_reads_only_marked_fences():
    text = "intro\n```bash\nnot me\n```\n<!-- newcomer-path -->\n```bash\necho a\necho b\n```\n" \
           "text\n  <!-- newcomer-path -->\n```\necho c\n```\n"
    assert newcomer_path.readme_blocks(text) == [(7, "echo a\necho b"), (13, "echo c")]


@pytest.mark.parametrize("text, problem", [
    ("no marker\n```bash\necho\n```\n", "no fenced block is marked"),
    ("<!-- newcomer-path -->\n\n```bash\necho\n```\n", "followed directly by a fenced block"),
    ("<!-- newcomer-path -->\n```bash\necho\n", "is not closed"),
])
def test_readme_blocks_refuses_bad_markup(text, problem):
    with pytest.raises(ValueError, match=problem):
        newcomer_path.readme_blocks(text, "X.md")


def test_script_substitutes_the_venv_line_exactly_once():
    blocks = [(3, f"# c\n{newcomer_path.VENV_LINE}\npython3 -m pip install -e ."), (9, "echo done")]
    script = newcomer_path.newcomer_script(blocks)
    assert newcomer_path.VENV_LINE not in script and "--system-site-packages .venv" in script
    assert script.index("pip install -e .") < script.index("echo done")
    with pytest.raises(ValueError, match="0 times"):
        newcomer_path.newcomer_script([(3, "echo no venv")])


def test_the_readme_marks_install_training_and_prediction():
    script = newcomer_path.newcomer_script(newcomer_path.readme_blocks((ROOT / "README.md").read_text()))
    for command in ("pip install -e .", "livseg_jax.train --config=configs/liver.py",
                    "livseg_jax.train --config=configs/tumor.py", "livseg_jax.predict", "--png"):
        assert command in script


def test_written_into_ignores_install_artefacts_only():
    before = {"!! .venv/"}
    after = before | {"!! livseg_jax.egg-info/", "!! livseg_jax/__pycache__/", "!! runs/", "?? preds/",
                      "!! tests/__pycache__/"}
    assert newcomer_path.written_into(before, after) == ["!! runs/", "?? preds/"]


def test_predictions_needs_a_label_map_and_its_png(tmp_path):
    import nibabel as nib
    import numpy as np

    with pytest.raises(ValueError, match="no predicted label map"):
        newcomer_path.predictions(tmp_path)
    out = tmp_path / "livseg" / "preds"
    out.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.array([[[0, 1, 2]]], np.uint8), np.eye(4)), out / "segmentation-9.nii.gz")
    with pytest.raises(ValueError, match="PNG overlay"):
        newcomer_path.predictions(tmp_path)
    (out / "segmentation-9.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert newcomer_path.predictions(tmp_path) == [(out / "segmentation-9.nii.gz", out / "segmentation-9.png")]


@pytest.mark.slow
def test_newcomer_path_runs_as_written():
    done = subprocess.run([sys.executable, "-m", "tools.newcomer_path"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "newcomer path: ok" in done.stdout


def test_summary_hides_the_backend_probe_info_but_not_its_warnings(monkeypatch, caplog):
    import logging

    from livseg_jax.models import summary

    logger = logging.getLogger("jax._src.xla_bridge")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TPU_MIN_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    summary.quiet_backend_probe()
    with caplog.at_level(logging.INFO):
        logger.info("Unable to initialize backend 'tpu': no TPU")
        logger.warning("An NVIDIA GPU may be present on this machine")
    assert [r.getMessage() for r in caplog.records] == ["An NVIDIA GPU may be present on this machine"]


@pytest.mark.parametrize("config_file", ["configs/liver.py", "configs/tumor.py"])
def test_livseg_tiny_shrinks_the_readme_configs_and_refuses_other_values(config_file, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_under_test", ROOT / config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("LIVSEG_TINY", raising=False)
    demo = module.get_config("")
    monkeypatch.setenv("LIVSEG_TINY", "1")
    tiny = module.get_config("")
    assert tiny.model.features == (4, 8) and tiny.data.patch_size == (16, 16, 16)
    assert tiny.train.num_epochs * tiny.train.steps_per_epoch < demo.train.num_epochs * demo.train.steps_per_epoch
    assert tiny.data.synthetic.num_cases == demo.data.synthetic.num_cases  # the README predicts volume-9
    monkeypatch.setenv("LIVSEG_TINY", "yes")
    with pytest.raises(ValueError, match="LIVSEG_TINY"):
        module.get_config("")
