"""Print how closely the PyTorch twins reproduce the Flax models, per variant and per head.

    python -m tools.parity_report [--features 8,16,16,32,32] [--patch 16,32,32] [--batch 2]
                                  [--variants unet,...] [--msca-mode 2d] [--seed 0]

For every variant, with random weights and random non-trivial BatchNorm statistics (float32, CPU):
  eval  torch->flax   torch weights imported into Flax; BatchNorm on running statistics
  eval  flax->torch   Flax weights exported to torch
  train torch->flax   training mode (batch statistics), same weights
  deploy              each framework re-parameterises its own model (BN folded, RepConv merged)
  one Adam step       HybridLoss1 with deep supervision, torch.optim.Adam vs optax.adam
Each row gives max |torch - flax|, max |torch| and their ratio (the relative error). Summary rows
give relative errors only: the worst BatchNorm running mean / running variance after one
training-mode update (variance after PyTorch's unbiased n/(n-1) correction, see docs/interop.md);
for the Adam step the loss, the gradients (max |diff| over the largest gradient) and the update
(max |diff| over the learning rate, where |g| >= 1e-4).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from livseg_jax.config import model_config  # noqa: E402
from livseg_jax.interop import mapping  # noqa: E402
from livseg_jax.interop import torch_models as tm  # noqa: E402
from livseg_jax.models import VARIANTS, build_model, reparameterize  # noqa: E402
from tools import parity  # noqa: E402
from tools.torch_losses import deep_supervision_loss_torch  # noqa: E402


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _row(variant: str, mode: str, head: str, torch_out: np.ndarray, flax_out) -> str:
    max_abs, rel = parity.errors(torch_out, np.asarray(flax_out))
    scale = float(np.abs(torch_out).max())
    return f"| {variant} | {mode} | {head} | {max_abs:.2e} | {scale:.2e} | {rel:.2e} |"


def _rows(variant: str, mode: str, outs_t, outs_f) -> list[str]:
    return [_row(variant, mode, f"head{i}", t, f)
            for i, (t, f) in enumerate(zip(outs_t, outs_f, strict=True))]


def _train_stats_error(torch_model, before, after_t, stats_f, counts) -> tuple[float, float]:
    """Returns the worst relative error of running means and of (corrected) running variances."""
    flat = mapping.flatten(stats_f)
    worst_mean = worst_var = 0.0
    for module, n in counts.items():
        path = module.replace(".", "/")
        worst_mean = max(worst_mean, parity.errors(after_t[f"{module}.running_mean"],
                                                   np.asarray(flat[f"{path}/mean"]))[1])
        predicted = parity.torch_running_var_from_flax(np.asarray(flat[f"{path}/var"]),
                                                       before[f"{module}.running_var"], n)
        worst_var = max(worst_var, parity.errors(after_t[f"{module}.running_var"], predicted)[1])
    return worst_mean, worst_var


def _step_row(cfg, torch_model, variables, x: np.ndarray) -> str:
    """Returns the row comparing one HybridLoss1 + deep-supervision Adam step in both frameworks."""
    import jax
    import optax

    from livseg_jax import losses
    from livseg_jax.config import base_config

    loss_cfg, optim = base_config().loss, base_config().optim
    labels = (np.random.default_rng(1).random(x.shape[:-1]) < 0.3).astype(np.int32)
    torch_model.train()
    opt = torch.optim.Adam(torch_model.parameters(), lr=optim.learning_rate, betas=(optim.b1, optim.b2),
                           eps=optim.eps)
    before = {k: p.detach().numpy().copy() for k, p in torch_model.named_parameters()}
    heads = torch_model(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))))
    loss_t, _ = deep_supervision_loss_torch(heads, torch.from_numpy(labels), loss_cfg, loss_cfg.ds_alpha)
    opt.zero_grad()
    loss_t.backward()
    grads_t = {k: p.grad.numpy().copy() for k, p in torch_model.named_parameters()}
    opt.step()
    update_t = {k: p.detach().numpy() - before[k] for k, p in torch_model.named_parameters()}
    model = build_model(cfg)

    def loss_fn(params):
        out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return losses.deep_supervision_loss(out, labels, loss_cfg, loss_cfg.ds_alpha)[0]

    loss_f, grads_f = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
    tx = optax.adam(optim.learning_rate, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    update_f = mapping.flatten(tx.update(grads_f, tx.init(variables["params"]), variables["params"])[0])
    grads_f = mapping.flatten(grads_f)
    scale = max(float(np.abs(g).max()) for g in grads_f.values())
    grad_err = upd_err = 0.0
    for row in mapping.mapping_table(grads_t):
        path = row.flax_path.removeprefix("params/")
        to_flax = mapping.TRANSFORMS[row.transform][0]
        g_f = np.asarray(grads_f[path])
        grad_err = max(grad_err, float(np.abs(to_flax(grads_t[row.torch_name]) - g_f).max()) / scale)
        where = np.abs(g_f) >= 1e-4  # see tests: Adam amplifies gradient noise where |g| ~ eps
        diff = np.abs(to_flax(update_t[row.torch_name]) - np.asarray(update_f[path]))[where]
        upd_err = max(upd_err, float(diff.max(initial=0.0)) / optim.learning_rate)
    loss_err = abs(loss_t.item() - float(loss_f)) / abs(loss_t.item())
    return (f"| {cfg.name} | one Adam step: loss / gradients / update | all | | | "
            f"{loss_err:.2e} / {grad_err:.2e} / {upd_err:.2e} |")


def report_variant(cfg, x: np.ndarray, seed: int, step: bool = True) -> list[str]:
    """Returns the Markdown table rows of one variant."""
    name = cfg.name
    rows = []
    eval_fn = parity.flax_eval_all_heads(build_model(cfg))

    torch_model = parity.randomize_torch_(tm.torch_model_from_config(cfg), seed).eval()
    before = parity.torch_state_numpy(torch_model)
    variables = mapping.state_dict_to_variables(before, cfg)
    out_t, out_f = parity.torch_forward(torch_model, x), eval_fn(variables, x)
    rows += _rows(name, "eval torch->flax", out_t, out_f)

    exported = parity.random_flax_variables(mapping.flax_variable_shapes(cfg), seed + 1)
    other = parity.load_torch_state_numpy(tm.torch_model_from_config(cfg),
                                          mapping.variables_to_state_dict(exported, cfg)).eval()
    out_t, out_f = parity.torch_forward(other, x), eval_fn(exported, x)
    rows += _rows(name, "eval flax->torch", out_t, out_f)

    counts: dict[str, int] = {}
    for module_name, module in torch_model.named_modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.register_forward_hook(lambda m, args, out, key=module_name: counts.__setitem__(
                key, args[0].numel() // args[0].shape[1]))
    torch_model.train()
    out_t = parity.torch_forward(torch_model, x)
    out_f, stats_f = parity.flax_train_forward(build_model(cfg))(variables, x)
    worst_mean, worst_var = _train_stats_error(torch_model, before, parity.torch_state_numpy(torch_model),
                                               stats_f, counts)
    rows += _rows(name, "train torch->flax", out_t, out_f)
    rows.append(f"| {name} | train: running mean / var | all BN | | | {worst_mean:.2e} / {worst_var:.2e} |")

    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in before.items()})
    deploy_t = tm.reparameterize_torch(torch_model.eval()).eval()
    deploy_f = parity.flax_eval_all_heads(build_model(cfg, deploy=True))(reparameterize(variables), x)
    out_t = parity.torch_forward(deploy_t, x)
    rows.append(_row(name, "deploy (each re-parameterised)", f"head{len(cfg.features) - 2}", out_t[-1],
                     deploy_f[-1]))
    if step:  # last: the step changes the torch model's weights
        rows.append(_step_row(cfg, torch_model, variables, x))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Prints the parity table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", default="8,16,16,32,32")
    parser.add_argument("--patch", default="16,32,32", help="D,H,W, each divisible by 2^(levels-1)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--msca-mode", default="2d", choices=("2d", "3d"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-step", action="store_true", help="skip the (slow to compile) Adam step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    patch = _ints(args.patch)
    x = np.random.default_rng(args.seed).normal(size=(args.batch, *patch, 1)).astype(np.float32)
    print(f"torch {torch.__version__}, float32, CPU; features {args.features}, patch {args.patch}, "
          f"batch {args.batch}, msca_mode {args.msca_mode}, seed {args.seed}\n")
    print("| variant | mode | head | max abs err | max abs torch | relative |")
    print("|---|---|---|---:|---:|---:|")
    for name in args.variants.split(","):
        cfg = model_config(name)
        cfg.features = _ints(args.features)
        cfg.msca_mode = args.msca_mode
        start = time.time()
        for row in report_variant(cfg, x, args.seed, step=not args.no_step):
            print(row)
        print(f"{name}: {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
