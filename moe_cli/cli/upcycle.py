"""`moe upcycle`: dense checkpoint -> MoE whose experts copy the dense FFN, verified and saved."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moe_cli.cli.common import STATE, OverwriteOpt, console, say, user_errors, writable
from moe_cli.config import parse_assignments
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import save
from moe_cli.io.sources import load_source
from moe_cli.models.flops import param_counts
from moe_cli.models.upcycle import TOLERANCE, UpcycleMismatch, Verification
from moe_cli.moe.config import Balance, Gate, Impl, Init, MoELayout, Priority, RouterInit, Split, UpcycleCfg, flag
from moe_cli.train.build import upcycle_checkpoint

D = UpcycleCfg()  # the options' defaults are the config's


@user_errors
def upcycle(
    model: Annotated[str, typer.Argument(help="timm name (vit_small), hf-hub:org/name, .safetensors file or "
                                         "folder.", show_default=False)],
    experts: Annotated[int, typer.Option("--experts", "-e", help="Experts per MoE layer.")] = D.experts,
    k: Annotated[int, typer.Option("--k", "-k", help="Experts each token is routed to (top-k).")] = D.k,
    layers: Annotated[str, typer.Option(help="Which FFNs: all, every-N, last-N or a list like 0,3,5.")] = D.layers,
    gate: Annotated[Gate, typer.Option(help="topk: each token its k best experts (softmax); sigmoid_topk: the "
                                       "same on sigmoid scores (DeepSeek-V3); top_p: the fewest experts "
                                       "reaching --top-p; soft: all experts; expert_choice: each expert "
                                       "its best tokens.")] = D.gate,
    capacity_factor: Annotated[float | None, typer.Option(help="Token choice: capacity C = cf*k*T/N, overflow "
                                                          "dropped. Expert choice: C = cf*T/N (default 1).",
                                                          show_default=False)] = None,
    eval_capacity_factor: Annotated[float | None, typer.Option(help="Capacity factor in eval mode (default: "
                                                               "same).", show_default=False)] = None,
    priority: Annotated[Priority, typer.Option(help="Who keeps its place on overflow: slot (token order) or "
                                               "score (BPR).")] = D.priority,
    impl: Annotated[Impl, typer.Option(help="Expert dispatch: loop (F.linear per expert), grouped "
                                       "(grouped_mm), triton (fused kernels); auto picks.")] = D.impl,
    normalize: Annotated[bool, typer.Option(help="Softmax over the k kept logits (else top-k of the full "
                                            "softmax).")] = D.normalize,
    noise_std: Annotated[float, typer.Option(help="Std of Gaussian noise added to each expert copy.")] = D.noise_std,
    target: Annotated[str | None, typer.Option(help="Glob over module names for non-timm FFNs, e.g. "
                                               "'blocks.*.ffn'.", show_default=False)] = None,
    arch: Annotated[str | None, typer.Option(help="timm architecture of a plain .safetensors file.",
                                             show_default=False)] = None,
    model_arg: Annotated[list[str] | None, typer.Option("--model-arg", "-m", metavar="KEY=VALUE", help="timm kwarg "
                                                        "(repeat).", show_default=False)] = None,
    pretrained: Annotated[bool, typer.Option(help="Load pretrained weights for timm / hub names.")] = True,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: "
                                             "out/<model>-moe<E>k<K>).", show_default=False)] = None,
    tolerance: Annotated[float, typer.Option(help="Max allowed |dense - MoE| relative to max |dense|.")] =
        TOLERANCE,
    init: Annotated[Init, typer.Option(help="How experts start: copy (the dense FFN), drop (Drop-Upcycling: "
                                       "re-initialise a share of units), split (MoEfication: slices).")] =
        D.init,
    drop_ratio: Annotated[float, typer.Option(help="--init drop: share of hidden units re-initialised per expert.")]
        = D.drop_ratio,
    split: Annotated[Split, typer.Option(help="--init split: group units by balanced k-means (cluster) or at "
                                         "random.")] = D.split,
    router_init: Annotated[RouterInit, typer.Option(help="random; kmeans (centres of each layer's inputs on "
                                                    "--calib); activation (split: predict the most active "
                                                    "slice).")] = D.router_init,
    calib: Annotated[str | None, typer.Option(help="Calibration images for --router-init: digits or an image "
                                              "folder.", show_default=False)] = None,
    calib_batches: Annotated[int, typer.Option(help="Calibration batches of 64 images.")] = D.calib_batches,
    top_p: Annotated[float, typer.Option(help="--gate top_p: probability mass each token's experts reach "
                                         "(1 to k experts).")] = D.top_p,
    shared_experts: Annotated[int, typer.Option(help="Always-on experts added to the routed ones (DeepSeek-MoE, "
                                                "Qwen2-MoE).")] = D.shared_experts,
    shared_gate: Annotated[bool, typer.Option(help="Scale the shared experts per token by a sigmoid gate "
                                              "(Qwen2-MoE).")] = D.shared_gate,
    balance: Annotated[Balance, typer.Option(help="aux: load-balance loss; aux_free: a per-expert selection "
                                             "bias nudged after each step (DeepSeek-V3).")] = D.balance,
    bias_update: Annotated[float, typer.Option(help="--balance aux_free: bias step u per optimizer step.")] =
        D.bias_update,
    route_scale: Annotated[float, typer.Option(help="--gate sigmoid_topk: scale of the combine weights.")] =
        D.route_scale,
    overwrite: OverwriteOpt = False,
) -> None:
    """Upcycle a dense model into a Mixture-of-Experts and check it computes what the dense one did."""
    cfg = UpcycleCfg(experts=experts, k=k, gate=gate, normalize=normalize, capacity_factor=capacity_factor,
                     eval_capacity_factor=eval_capacity_factor, priority=priority, impl=impl, layers=layers,
                     target=target, noise_std=noise_std, init=init, drop_ratio=drop_ratio, split=split,
                     router_init=router_init, calib=calib, calib_batches=calib_batches, top_p=top_p,
                     shared_experts=shared_experts, shared_gate=shared_gate, balance=balance, bias_update=bias_update,
                     route_scale=route_scale).validate(flag)
    if out is not None:
        writable(out, overwrite)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder")
    source = load_source(model, pretrained=pretrained, arch=arch,
                         model_kwargs=parse_assignments(model_arg, "--model-arg"))
    name = source.architecture["name"]
    out = out or writable(Path("out") / f"{name}-moe{experts}k{k}", overwrite)
    dense_total, _ = param_counts(source.model)
    try:
        up = upcycle_checkpoint(source, cfg, seed=STATE["seed"], verify=True, tolerance=tolerance)
    except UpcycleMismatch:
        console.print("verify: [red]FAILED[/] — the upcycled model does not reproduce the dense model; "
                      "nothing was written")
        raise
    console.print(verify_line(up.verification, cfg))
    if up.initial_load:
        say(load_table(up.initial_load, cfg.router_init))
    path = save(source, out)
    say(summary_table(name, dense_total, source.model, source.moe))
    console.print(f"saved {path}")


def verify_line(v: Verification, cfg: UpcycleCfg) -> str:
    if v.skipped:
        return f"verify: skipped — {v.skipped}"
    expected = [w for w, on in (("noise asked for", cfg.noise_std > 0), ("init drop", cfg.init == "drop"),
                                (f"split, k={cfg.k} < {cfg.experts} experts", cfg.init == "split" and
                                 (cfg.k < cfg.experts or cfg.gate != "topk"))) if on]
    status = "[green]ok[/]" if v.ok else (f"[yellow]differs, as expected ({', '.join(expected)})[/]" if expected
                                          else "[red]FAILED[/]")
    return f"verify: max |dense - moe| = {v.max_diff:.3e} on a probe batch (tolerance {v.limit:.1e}, capacity " \
           f"limits lifted) {status}"


def load_table(load: dict, method: str) -> Table:
    table = Table(title=f"initial expert load ({method} router, calibration tokens)")
    table.add_column("layer")
    table.add_column("share of tokens per expert")
    table.add_column("max / mean", justify="right")
    for name, shares in load.items():
        table.add_row(name, " ".join(f"{v:.2f}" for v in shares), f"{max(shares) * len(shares):.2f}")
    return table


def summary_table(name: str, dense_total: int, sparse, cfg: MoELayout) -> Table:
    total, active = param_counts(sparse)
    table = Table(title=f"{name} -> MoE", show_header=True)
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("MoE", justify="right")
    table.add_row("params total", f"{dense_total / 1e6:.2f}M", f"{total / 1e6:.2f}M")
    table.add_row("params active / token", f"{dense_total / 1e6:.2f}M", f"{active / 1e6:.2f}M")
    table.add_row("MoE layers", "0", str(len(cfg.layers)))
    table.add_row("experts", "-", str(cfg.experts))
    table.add_row("k (active experts)", "-", "all" if cfg.gate == "soft" else str(cfg.k))
    table.add_row("gate", "-", str(cfg.gate))
    if cfg.shared_experts:
        table.add_row("shared experts", "-", f"{cfg.shared_experts}{' (gated)' if cfg.shared_gate else ''}")
    return table
