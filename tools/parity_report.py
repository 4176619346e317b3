"""Print how closely the PyTorch twins reproduce the Flax networks, per network and per head.

    python -m tools.parity_report [--features 8,16,16,32,32] [--patch 16,32,32] [--batch 2]
                                  [--networks unet,...] [--msca-mode 2d] [--cat-channels 16]
                                  [--seed 0] [--no-step]

For every network of `livseg_jax.models.NETWORKS` (the paper's family and the comparison
networks), with random weights and random non-trivial BatchNorm statistics (float32, CPU):
  eval  torch->flax   torch weights imported into Flax; BatchNorm on running statistics
  eval  flax->torch   Flax weights exported to torch
  train torch->flax   training mode (batch statistics), same weights
  deploy              each framework re-parameterises its own model (BN folded, RepConv merged)
  one Adam step       HybridLoss1 with deep supervision, torch.optim.Adam vs optax.adam
Each row gives max |torch - flax|, max |torch| and their ratio (the relative error). Summary rows
give relative errors only: the worst BatchNorm running mean / running variance after one
training-mode pass (variance after PyTorch's unbiased n/(n-1) correction, see docs/interop.md);
for the Adam step the loss, the gradients (max |diff| over the largest gradient) and the update
(max |diff| over the learning rate, where |g| >= 1e-4).
A second table is the converter's key report per network and form: the twin's tensors, the Flax
leaves they fill, the tensors dropped (`num_batches_tracked`), and what the strict converters
found missing, unexpected or mismatched, in both directions (all 0 when the twin fits).
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
from livseg_jax.models import NETWORKS, build_model, reparameterize  # noqa: E402
from tools import parity  # noqa: E402
from tools.torch_losses import deep_supervision_loss_torch  # noqa: E402


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _row(network: str, mode: str, head: str, torch_out: np.ndarray, flax_out) -> str:
    max_abs, rel = parity.errors(torch_out, np.asarray(flax_out))
    scale = float(np.abs(torch_out).max())
    return f"| {network} | {mode} | {head} | {max_abs:.2e} | {scale:.2e} | {rel:.2e} |"


def _rows(network: str, mode: str, outs_t, outs_f) -> list[str]:
    return [_row(network, mode, f"head{i}", t, f)
            for i, (t, f) in enumerate(zip(outs_t, outs_f, strict=True))]


def _train_stats_error(before, after_t, stats_f, counts) -> tuple[float, float]:
    """Returns the worst relative error of running means and of (corrected) running variances.

    `counts[module]` lists n (values per channel) of each application of that BatchNorm in the
    pass. A BatchNorm applied k times (R2U-Net's shared recurrent units) is updated k times in
    both frameworks, so the rule sees the old variance kept as (1 - m)^k of itself.
    """
    flat = mapping.flatten(stats_f)
    worst_mean = worst_var = 0.0
    for module, sizes in counts.items():
        if len(set(sizes)) != 1:
            raise ValueError(f"BatchNorm {module} saw inputs of different sizes {sizes}: the variance rule "
                             "needs one n per module")
        path = module.replace(".", "/")
        worst_mean = max(worst_mean, parity.errors(after_t[f"{module}.running_mean"],
                                                   np.asarray(flat[f"{path}/mean"]))[1])
        old = before[f"{module}.running_var"] * (1.0 - parity.TORCH_BN_MOMENTUM) ** (len(sizes) - 1)
        predicted = parity.torch_running_var_from_flax(np.asarray(flat[f"{path}/var"]), old, sizes[0])
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


def report_network(cfg, x: np.ndarray, seed: int, step: bool = True) -> list[str]:
    """Returns the Markdown parity-table rows of one network."""
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

    counts: dict[str, list[int]] = {}
    hooks = [module.register_forward_hook(lambda m, args, out, key=module_name: counts.setdefault(key, []).append(
                 args[0].numel() // args[0].shape[1]))
             for module_name, module in torch_model.named_modules() if isinstance(module, torch.nn.BatchNorm3d)]
    torch_model.train()
    out_t = parity.torch_forward(torch_model, x)
    for hook in hooks:
        hook.remove()
    out_f, stats_f = parity.flax_train_forward(build_model(cfg))(variables, x)
    worst_mean, worst_var = _train_stats_error(before, parity.torch_state_numpy(torch_model),
                                               stats_f, counts)
    rows += _rows(name, "train torch->flax", out_t, out_f)
    rows.append(f"| {name} | train: running mean / var | all BN | | | {worst_mean:.2e} / {worst_var:.2e} |")

    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in before.items()})
    deploy_t = tm.reparameterize_torch(torch_model.eval()).eval()
    deploy_f = parity.flax_eval_all_heads(build_model(cfg, deploy=True))(reparameterize(variables), x)
    out_t = parity.torch_forward(deploy_t, x)
    rows.append(_row(name, "deploy (each re-parameterised)", f"head{len(out_f) - 1}", out_t[-1], deploy_f[-1]))
    if step:  # last: the step changes the torch model's weights
        rows.append(_step_row(cfg, torch_model, variables, x))
    return rows


def _conversion_counts(convert, *args) -> tuple[tuple[int, int, int], str]:
    """Returns ((missing, unexpected, mismatched) counts, the error's text or "") of `convert(*args)`."""
    try:
        convert(*args)
    except mapping.ConversionError as err:
        return (len(err.missing), len(err.unexpected), len(err.mismatched)), str(err)
    return (0, 0, 0), ""


def key_report(cfg) -> tuple[list[str], list[str]]:
    """Returns (Markdown rows, error texts) of the converter's key report, training and deploy form.

    Per form: the twin's tensors, the Flax leaves, the tensors dropped on import, and
    missing / unexpected / mismatched as the strict converters count them in each direction.
    """
    rows, errors = [], []
    for deploy in (False, True):
        state = parity.torch_state_numpy(tm.torch_model_from_config(cfg, deploy=deploy))
        shapes = mapping.flax_variable_shapes(cfg, deploy=deploy)
        dropped = sum(row.transform == "drop" for row in mapping.mapping_table(state))
        flax_vars = parity.random_flax_variables(shapes)
        torch_shapes = {k: (v.shape, v.dtype) for k, v in state.items()}
        found = []
        for convert, args in ((mapping.torch_to_flax, (state, shapes)),
                              (mapping.flax_to_torch, (flax_vars, torch_shapes))):
            counts, text = _conversion_counts(convert, *args)
            found.append(" / ".join(map(str, counts)))
            errors += [text] if text else []
        rows.append(f"| {cfg.name} | {'deploy' if deploy else 'training'} | {len(state)} | "
                    f"{len(mapping.flatten(shapes))} | {dropped} | {found[0]} | {found[1]} |")
    return rows, errors


def main(argv: list[str] | None = None) -> None:
    """Prints the parity table and the converter's key report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", default="8,16,16,32,32")
    parser.add_argument("--patch", default="16,32,32", help="D,H,W, each divisible by 2^(levels-1)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--networks", "--variants", default=",".join(NETWORKS),
                        help="comma-separated model.name values (default: every network)")
    parser.add_argument("--msca-mode", default="2d", choices=("2d", "3d"))
    parser.add_argument("--cat-channels", type=int, default=16,
                        help="UNet 3+'s decoder fusion width (the paper's 64; 16 keeps the report quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-step", action="store_true", help="skip the (slow to compile) Adam step")
    args = parser.parse_args(argv)
    networks = args.networks.split(",")
    unknown = [n for n in networks if n not in NETWORKS]
    if unknown:
        parser.error(f"--networks: unknown {unknown}; choose from {sorted(NETWORKS)}")
    torch.set_num_threads(args.threads)
    patch = _ints(args.patch)
    x = np.random.default_rng(args.seed).normal(size=(args.batch, *patch, 1)).astype(np.float32)
    configs = []
    for name in networks:
        cfg = model_config(name)
        cfg.features = _ints(args.features)
        cfg.msca_mode = args.msca_mode
        if name == "unet3plus":
            cfg.cat_channels = args.cat_channels
        configs.append(cfg)
    print(f"torch {torch.__version__}, float32, CPU; features {args.features}, patch {args.patch}, "
          f"batch {args.batch}, msca_mode {args.msca_mode}, unet3plus cat_channels {args.cat_channels}, "
          f"seed {args.seed}\n")
    print("| network | mode | head | max abs err | max abs torch | relative |")
    print("|---|---|---|---:|---:|---:|")
    for cfg in configs:
        start = time.time()
        for row in report_network(cfg, x, args.seed, step=not args.no_step):
            print(row, flush=True)
        print(f"{cfg.name}: {time.time() - start:.0f} s", file=sys.stderr)
    print("\nConverter key report (missing / unexpected / mismatched):\n")
    print("| network | form | torch tensors | Flax leaves | dropped | torch->flax | flax->torch |")
    print("|---|---|---:|---:|---:|---:|---:|")
    all_errors = []
    for cfg in configs:
        rows, errors = key_report(cfg)
        print("\n".join(rows))
        all_errors += errors
    for text in all_errors:
        print(f"\n{text}")


if __name__ == "__main__":
    main()
