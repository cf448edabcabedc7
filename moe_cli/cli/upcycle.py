"""`moe upcycle`: dense checkpoint -> MoE whose experts copy the dense FFN, verified and saved."""

from __future__ import annotations

import copy
from pathlib import Path

import typer
from rich.table import Table

from moe_cli.cli.common import STATE, console, parse_kv, say, user_errors
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import save
from moe_cli.models.probe import probe_batch
from moe_cli.models.sources import load_source
from moe_cli.models.surgery import MoEConfig, max_output_diff, param_counts

TOLERANCE = 1e-4


@user_errors
def upcycle(
    model: str = typer.Argument(..., help="timm name (vit_small), hf-hub:org/name, .safetensors file or folder."),
    experts: int = typer.Option(4, "--experts", "-e", help="Experts per MoE layer."),
    k: int = typer.Option(2, "--k", "-k", help="Experts each token is routed to (top-k)."),
    layers: str = typer.Option("all", help="Which FFNs: all, every-N, last-N or a list like 0,3,5."),
    gate: str = typer.Option("topk", help="topk (token choice), expert_choice, or soft (dense, all experts)."),
    capacity_factor: float | None = typer.Option(None, help="Token-choice capacity C = cf*k*T/N (overflow dropped);"
                                                 " expert choice: C = cf*T/N (default 1)."),
    eval_capacity_factor: float | None = typer.Option(None, help="Capacity factor in eval mode (default: same)."),
    priority: str = typer.Option("slot", help="Overflow priority: slot (k-slot, token order) or score (BPR)."),
    impl: str = typer.Option("auto", help="Expert dispatch: auto, loop (F.linear per expert) or grouped (grouped_mm)."),
    normalize: bool = typer.Option(True, help="Softmax over the k kept logits (else top-k of the full softmax)."),
    noise_std: float = typer.Option(0.0, help="Std of Gaussian noise added to each expert copy."),
    target: str | None = typer.Option(None, help="Glob over module names for non-timm FFNs, e.g. 'blocks.*.ffn'."),
    arch: str | None = typer.Option(None, help="timm architecture of a plain .safetensors file."),
    model_arg: list[str] | None = typer.Option(None, "--model-arg", "-m", help="timm kwarg KEY=VALUE (repeat)."),
    pretrained: bool = typer.Option(True, help="Load pretrained weights for timm / hub names."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default: out/<model>-moe<E>k<K>)."),
    tolerance: float = typer.Option(TOLERANCE, help="Max allowed |dense - MoE| relative to max |dense|."),
) -> None:
    """Upcycle a dense model into a Mixture-of-Experts and check it computes what the dense one did."""
    routing = {"capacity_factor": capacity_factor, "eval_capacity_factor": eval_capacity_factor,
               "priority": priority, "impl": impl}
    MoEConfig(experts, k, gate, normalize, noise_std, **routing).validate()
    if gate != "topk" and not normalize:
        raise ConfigError("--no-normalize only applies to --gate topk")
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    source = load_source(model, pretrained=pretrained, arch=arch, model_kwargs=parse_kv(model_arg, "--model-arg"))
    if source.moe is not None:
        raise ConfigError(f"{model} is already a MoE checkpoint ({source.moe.experts} experts)")
    dense = copy.deepcopy(source.model).eval()
    source.upcycle(experts=experts, k=k, layers=layers, target=target, gate=gate, normalize=normalize,
                   noise_std=noise_std, seed=STATE["seed"], **routing)
    sparse, cfg = source.model, source.moe
    probe = probe_batch(dense, seed=STATE["seed"])
    if gate == "expert_choice":
        ok = True
        console.print("verify: skipped — expert choice gives each token a varying number of experts, so the MoE "
                      "does not reproduce the dense output by design")
    else:
        diff, scale = max_output_diff(dense, sparse, probe)
        limit = tolerance * max(1.0, scale)
        ok = diff <= limit
        noisy = "[yellow]differs (noise asked for)[/]"
        status = "[green]ok[/]" if ok else (noisy if noise_std > 0 else "[red]FAILED[/]")
        console.print(f"verify: max |dense - moe| = {diff:.3e} on a probe batch {tuple(probe.shape)} "
                      f"(tolerance {limit:.1e}, capacity limits lifted) {status}")
    if not ok and noise_std == 0:
        console.print("[red]the upcycled model does not reproduce the dense model; nothing was written[/]")
        raise typer.Exit(1)
    name = source.architecture["name"]
    target_dir = out or Path("out") / f"{name}-moe{experts}k{k}"
    path = save(source, target_dir)
    say(summary_table(name, dense, sparse, cfg))
    console.print(f"saved {path}")


def summary_table(name: str, dense, sparse, cfg: MoEConfig) -> Table:
    dense_total, _ = param_counts(dense)
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
    table.add_row("gate", "-", cfg.gate)
    return table
