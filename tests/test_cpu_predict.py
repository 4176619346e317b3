"""The CPU prediction path: ahead-of-time compiled stages, and the CPU's own defaults, against the
plain jitted reference."""

import jax
import jax.numpy as jnp
import numpy as np

from livseg_jax.data.preprocess import PreprocessSettings
from livseg_jax.inference.two_stage import Predictor, StageModel, compiled_stage

EXACT = dict(body_threshold_hu=-500.0, inplane_factor=1, target_slice_spacing=0.0,
             hu_min=-200.0, hu_max=200.0, hu_scale=200.0)


def counting_model(threshold: float, executions: list):
    """Returns a window function that records each execution (not each trace) in `executions`."""

    def window_fn(variables, x):
        jax.debug.callback(lambda: executions.append(1))
        p = jax.nn.sigmoid((x - threshold) * variables["gain"])
        return jnp.concatenate([1 - p, p], axis=-1)

    return window_fn


def stage(name: str, window_fn, batch_size: int = 2) -> StageModel:
    return StageModel(stage=name, window_fn=jax.jit(window_fn), variables={"gain": jnp.float32(8.0)},
                      num_classes=2, window=(8, 16, 16),
                      preprocessing=PreprocessSettings.from_config(EXACT), batch_size=batch_size,
                      liver_margin_mm=3.0)


def phantom() -> np.ndarray:
    ct = np.full((20, 36, 40), -1000.0, np.float32)
    ct[2:18, 4:32, 4:36] = 0.0
    ct[5:14, 8:24, 8:28] = 150.0  # liver
    ct[7:10, 12:16, 12:16] = 250.0  # tumour
    return ct


def test_warmup_compiles_without_running_a_window_and_predicts_as_before():
    executions = []
    liver, tumor = stage("liver", counting_model(0.5, executions)), stage("tumor", counting_model(0.9, executions))
    reference = Predictor(liver, tumor).predict_array(phantom(), (2.0, 1.0, 1.0))
    executions.clear()
    predictor = Predictor(liver, tumor)
    assert set(predictor.warmup()) == {"liver", "tumor"}
    jax.effects_barrier()
    assert executions == []  # compiled, not run: a CPU start does not pay for a batch of windows
    assert predictor.liver.window_fn is not liver.window_fn
    result = predictor.predict_array(phantom(), (2.0, 1.0, 1.0))
    assert executions  # the compiled programs are the ones that ran
    np.testing.assert_array_equal(result.labels, reference.labels)
    assert set(np.unique(result.labels)) == {0, 1, 2}


def test_compiled_stage_gives_the_jitted_window_probabilities():
    model = stage("liver", counting_model(0.5, []), batch_size=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 16, 16, 1)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(compiled_stage(model).window_fn(model.variables, x)),
                                  np.asarray(model.window_fn(model.variables, x)))


def test_cpu_stages_use_the_cpu_forms_and_give_the_reference_forms_probabilities(tmp_path):
    from livseg_jax.config import base_config
    from livseg_jax.inference.two_stage import CPU_INFERENCE_FORMS, load_stage_model
    from livseg_jax.models import build_model, init_variables
    from livseg_jax.models.forms import CONV_FORM_KEYS, REFERENCE_FORMS
    from livseg_jax.run_dir import write_variables

    config = base_config()  # the paper's network, which has depthwise convolutions, at a tiny width
    config.stage, config.model.features, config.data.patch_size = "liver", (4, 8), (16, 16, 16)
    variables = jax.device_get(init_variables(build_model(config.model), jax.random.key(0), (16, 16, 16)))
    loaded = load_stage_model(write_variables(tmp_path / "run", variables, config), "liver", batch_size=2)
    assert jax.default_backend() == "cpu"
    # The convolutions' forms; BatchNorm's form is a training computation (models/forms.py).
    assert loaded.description["forms"] == {**{k: REFERENCE_FORMS[k] for k in CONV_FORM_KEYS}, **CPU_INFERENCE_FORMS}
    reference = build_model(_pinned(config.model, REFERENCE_FORMS), deploy=False)
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    want = jax.nn.softmax(reference.apply(variables, jnp.asarray(x), train=False), axis=-1)
    np.testing.assert_allclose(np.asarray(loaded.window_fn(loaded.variables, jnp.asarray(x))), np.asarray(want),
                               atol=2e-5)


def _pinned(model_config, forms):
    config = model_config.copy_and_resolve_references()
    config.update(forms)
    return config


def test_a_cpu_predicts_one_window_per_call_unless_told_and_gets_the_same_labels():
    from livseg_jax.predict import default_batch_size

    assert default_batch_size(None, "cpu") == 1
    assert default_batch_size(None, "gpu") is None  # the config's
    assert default_batch_size(3, "cpu") == 3
    fn = counting_model(0.5, [])
    labels = [Predictor(stage("liver", fn, batch_size=b)).predict_array(phantom(), (2.0, 1.0, 1.0)).labels
              for b in (1, 2)]
    np.testing.assert_array_equal(labels[0], labels[1])
    assert labels[0].any()
