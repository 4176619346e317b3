"""experiments/real_data.py without training: arm configs, a missing key refused, the merged JSON and table."""

import json
import math

import pytest

from experiments import real_data


def args_for(tmp_path, *extra):
    return real_data.parse_args(["--workdir", str(tmp_path), "--output", str(tmp_path / "out.json"), *extra])


def test_the_arms_differ_only_in_their_recipe(tmp_path):
    args = args_for(tmp_path, "--augment-override", "data.augment.flips=False", "--liver-steps", "120")
    a, b, c = (real_data.arm_config("liver", arm, tmp_path / "train.txt", args) for arm in "abc")
    assert a.preprocess.spacing_mode == "fixed_factor" and a.preprocess.inplane_factor == 2
    assert b.preprocess.spacing_mode == "target" and tuple(b.preprocess.target_spacing) == (1.6, 1.5, 1.5)
    assert c.data.augment.flips is False and b.data.augment.flips is True
    assert a.train.steps_per_epoch * a.train.num_epochs >= 120 and a.data.num_val_cases == 0
    assert a.data.list_file == str(tmp_path / "train.txt") and a.optim.learning_rate == 1e-3
    b.preprocess.spacing_mode = c.preprocess.spacing_mode = "x"  # the rest is the same
    assert a.model.to_dict() == b.model.to_dict() == c.model.to_dict()


def test_arm_c_is_refused_clearly_while_its_key_is_missing(tmp_path, capsys):
    args = args_for(tmp_path, "--augment-override", "data.augment.no_such_key=True")
    with pytest.raises(SystemExit, match=r"arm c.*no key 'data.augment.no_such_key'.*--arms a,b"):
        real_data.arm_config("tumor", "c", tmp_path / "train.txt", args)
    with pytest.raises(SystemExit):
        args_for(tmp_path, "--arms", "a,e")
    assert "unknown arm(s) ['e']" in capsys.readouterr().err


def part(arm, held, liver, tumor, fp):
    return {"arm": arm, "held_out": held, "metrics": {
        "liver_dice": liver, "liver_asd": 2.0, "tumor_dice": tumor, "tumor_asd": None,
        "n_hit": 1, "n_true": 2, "n_false_positive": fp}}


def test_parts_merge_into_means_per_arm_and_a_table(tmp_path):
    args = args_for(tmp_path, "--arms", "a,d")
    args.folds, args.all_cases = ["x", "y"], ["x", "y"]
    for p in (part("a", "x", 0.9, 0.2, 10), part("a", "y", 0.7, 0.4, 20), part("d", "x", 0.9, 0.5, 2)):
        real_data.write_json(real_data.part_path(args, p["arm"], p["held_out"]), p)
    result = json.loads(real_data.merge(args).read_text())
    assert result["summary"]["a"]["liver_dice"] == pytest.approx(0.8)
    assert result["summary"]["a"]["n_false_positive"] == pytest.approx(15)
    assert result["summary"]["a"]["tumor_asd"] is None and not result["complete"]
    table = real_data.markdown_table(result)
    assert "| a | y | 0.700 | 2.0 | 0.400 | – | 1/2 | 20 |" in table
    assert "| d | " in table and math.isfinite(result["summary"]["d"]["tumor_dice"])
