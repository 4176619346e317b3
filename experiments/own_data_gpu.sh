#!/usr/bin/env bash
# Runs docs/own_data.md "On a GPU" as written and times each command: the table there comes from it.
#
#   bash experiments/own_data_gpu.sh PHASE OUT_DIR
#
# PHASE "liver" imports 3D-IRCADb 1.17 and trains the liver stage; "rest" (the same HOME, later)
# trains the tumour stage on stage-1 crops, post-processes, predicts and evaluates. Two phases
# because a device command may run 10 minutes at most. HOME is `runs/gpu_home` in this checkout
# (git-ignored, empty at the start of "liver"), so the data, caches and compilation cache start
# empty and ~/livseg/... in the commands lands there. Each command's console goes to
# OUT_DIR/<name>.log and its wall time to OUT_DIR/times.tsv; train prints its compile time and
# peak device memory, predict writes them into segmentation-117_timings.json (copied to OUT_DIR).
# Needs ../shared/data beside the checkout (on the device machine: a symlink to a carried copy).
set -euo pipefail
phase=$1
out=$(realpath -m "$2")
mkdir -p "$out"
export HOME=$PWD/runs/gpu_home
if [ "$phase" = liver ]; then
  rm -rf "$HOME"
fi
mkdir -p "$HOME/livseg/data/mine"

timed() {  # timed NAME COMMAND...: runs it, console to NAME.log, wall seconds to times.tsv
  local name=$1; shift
  local start end
  start=$(date +%s.%N)
  "$@" >"$out/$name.log" 2>&1 || { echo "error: $name failed (exit $?), see $out/$name.log" >&2; tail -20 "$out/$name.log" >&2; exit 1; }
  end=$(date +%s.%N)
  python3 -c "import sys; print(f\"{sys.argv[1]}\\t{float(sys.argv[3]) - float(sys.argv[2]):.1f}\")" "$name" "$start" "$end" | tee -a "$out/times.tsv"
}

S="--config.data.num_val_cases=1 --config.train.num_epochs=2 --config.train.steps_per_epoch=100 --config.train.eval_every_epochs=1"
if [ "$phase" = liver ]; then
  timed import python3 -m livseg_jax.data.ircadb ../shared/data/3Dircadb1/3Dircadb1.17 ~/livseg/data/mine
  ln -s "$PWD"/../shared/data/lits-sample/volume-117.nii.gz "$PWD"/../shared/data/lits-sample/segmentation-117.nii.gz ~/livseg/data/mine/
  # shellcheck disable=SC2086  # $S: one flag per word, as in the docs
  timed liver python3 -m livseg_jax.train --config=configs/liver.py:fewshot --config.data.root="$HOME"/livseg/data/mine $S --workdir="$HOME"/livseg/runs/liver_mine
elif [ "$phase" = rest ]; then
  rm -rf ~/livseg/runs/tumor_mine ~/livseg/preds_mine  # a rerun times the commands from the start
  # shellcheck disable=SC2086
  timed tumor python3 -m livseg_jax.train --config=configs/tumor.py:fewshot --config.data.root="$HOME"/livseg/data/mine $S \
      --config.data.tumor_crop_source=stage1 --config.data.stage1_run="$HOME"/livseg/runs/liver_mine --workdir="$HOME"/livseg/runs/tumor_mine
  timed postprocess python3 -m livseg_jax.postprocess --run ~/livseg/runs/tumor_mine --liver ~/livseg/runs/liver_mine
  timed predict python3 -m livseg_jax.predict --liver ~/livseg/runs/liver_mine --tumor ~/livseg/runs/tumor_mine -i ~/livseg/data/mine/volume-117.nii.gz -o ~/livseg/preds_mine --png
  timed evaluate python3 -m livseg_jax.evaluate --pred ~/livseg/preds_mine --gt ~/livseg/data/mine
  cp ~/livseg/preds_mine/*_timings.json ~/livseg/preds_mine/evaluation.json "$out"/ 2>/dev/null || true
else
  echo "error: phase must be liver or rest, not $phase" >&2
  exit 2
fi
