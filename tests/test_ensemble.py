"""Ensembles: the softmax of several runs averaged inside the sliding window (`ensemble_window_fn`,
`ensemble_stage_model`, `load_ensemble`)."""

import dataclasses

import numpy as np
import pytest
from helpers import random_unet_variables

from livseg_jax.config import base_config, model_config
from livseg_jax.data.preprocess import PreprocessSettings
from livseg_jax.inference.sliding_window import ensemble_window_fn, sliding_window, window_predict_fn
from livseg_jax.inference.two_stage import StageModel, ensemble_stage_model, load_ensemble
from livseg_jax.models import build_model
from livseg_jax.run_dir import write_variables

WINDOW = (16, 16, 16)


def member(features, seed):
    cfg = model_config("unet")
    cfg.features = features
    model = build_model(cfg, deploy=False)
    fn = window_predict_fn(lambda v, x: model.apply(v, x, train=False))
    return fn, random_unet_variables(model, WINDOW, seed)


@pytest.fixture(scope="module")
def members():
    # Two different networks (widths differ, so do their parameter trees), each with its own weights.
    return [member((4, 8), seed=1), member((6, 8), seed=2)]


def probs(image, fn, variables):
    return sliding_window(image, fn, variables, WINDOW, overlap=0.5, batch_size=2, output="probs",
                          num_classes=2)


def test_ensemble_of_two_runs_equals_the_mean_of_their_softmaxes(members):
    image = np.random.default_rng(0).normal(size=(20, 24, 18)).astype(np.float32)
    singles = [probs(image, fn, v) for fn, v in members]
    assert np.abs(singles[0] - singles[1]).max() > 1e-2  # the members disagree: the test can fail
    ensemble = ensemble_window_fn([fn for fn, _ in members])
    together = probs(image, ensemble, tuple(v for _, v in members))
    np.testing.assert_allclose(together, (singles[0] + singles[1]) / 2, rtol=0, atol=1e-5)
    labels = sliding_window(image, ensemble, tuple(v for _, v in members), WINDOW, 0.5, 2, output="labels")
    np.testing.assert_array_equal(labels, np.argmax(together, -1))


def test_ensemble_needs_one_variable_tree_per_member(members):
    ensemble = ensemble_window_fn([fn for fn, _ in members])
    with pytest.raises(ValueError, match="2 members but got 1"):
        probs(np.zeros(WINDOW, np.float32), ensemble, (members[0][1],))


def stage_model(source, **changes):
    fields = dict(stage="liver", window_fn=lambda v, x: x, variables={}, num_classes=2, window=WINDOW,
                  preprocessing=PreprocessSettings.from_config(base_config().preprocess),
                  description={"source": source})
    return dataclasses.replace(StageModel(**fields), **changes)


@pytest.mark.parametrize("change", [dict(window=(16, 16, 32)), dict(num_classes=3), dict(overlap=0.25),
                                    dict(preprocessing=PreprocessSettings.from_config(
                                        base_config().preprocess.to_dict() | {"hu_max": 300.0}))])
def test_runs_that_disagree_on_window_classes_or_preprocessing_are_refused(change):
    (name,) = change
    with pytest.raises(ValueError, match=rf"run-b: {name} .* differs from .* of run-a"):
        ensemble_stage_model([stage_model("run-a"), stage_model("run-b", **change)])


def test_load_ensemble_reads_each_run_and_keeps_one_run_as_it_is(tmp_path, members):
    config = base_config()
    config.model = model_config("unet")
    config.model.features = (4, 8)
    config.data.patch_size = WINDOW
    runs = []
    for seed in (1, 2):
        runs.append(write_variables(tmp_path / f"fold-{seed}", random_unet_variables(
            build_model(config.model, deploy=False), WINDOW, seed), config))
    ensemble = load_ensemble(runs, "liver")
    assert len(ensemble.variables) == 2
    assert [m["source"] for m in ensemble.description["ensemble"]] == [str(r) for r in runs]
    single = load_ensemble(runs[0], "liver")
    assert single.description["source"] == str(runs[0]) and "ensemble" not in single.description
    # The loaded ensemble is the mean of its loaded members, window by window.
    image = np.random.default_rng(3).normal(size=(18, 16, 20)).astype(np.float32)
    members_probs = [probs(image, m.window_fn, m.variables) for m in (load_ensemble(r, "liver") for r in runs)]
    np.testing.assert_allclose(probs(image, ensemble.window_fn, ensemble.variables),
                               np.mean(members_probs, axis=0), rtol=0, atol=1e-5)
