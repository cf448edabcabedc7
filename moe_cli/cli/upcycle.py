"""`moe upcycle`: dense checkpoint -> MoE whose experts copy the dense FFN, verified and saved."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moe_cli.checks import labelled
from moe_cli.cli.common import STATE, OverwriteOpt, console, layer_labels, say, user_errors, writable
from moe_cli.config import parse_assignments
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import save
from moe_cli.io.sources import load_source
from moe_cli.models.flops import param_counts
from moe_cli.models.upcycle import TOLERANCE, UpcycleMismatch, Verification
from moe_cli.moe.config import MoELayout, UpcycleCfg, enum_type, flag
from moe_cli.runtime import describe
from moe_cli.train.build import upcycle_checkpoint


def config_options(cls) -> list[inspect.Parameter]:
    """One keyword parameter with a typer option per field of the config dataclass ``cls`` (name ``--field-name``,
    type and default from the field, help from its ``doc`` and, for a choice, the choice's own help), except the
    fields marked ``cli=False``."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind = enum_type(hints[f.name])
        help_text = f.metadata.get("doc", "") + (f" {describe(kind)}." if kind is not None and describe(kind) else "")
        long = f"{flag(f.name)}/--no-{flag(f.name)[2:]}" if hints[f.name] is bool else flag(f.name)
        names = [long, *([f.metadata["short"]] if "short" in f.metadata else [])]
        option = typer.Option(*names, help=help_text, show_default=f.default is not None)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=Annotated[hints[f.name], option]))
    return params


def with_config_options(cls):
    """Decorate a command whose ``**fields`` are the fields of ``cls``: typer sees one option per field."""

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        first = [p for p in own if p.default is inspect.Parameter.empty]
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.default is not inspect.Parameter.empty]
        params = [*first, *config_options(cls), *rest]
        fn.__signature__ = sig.replace(parameters=params)
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn

    return decorate


@user_errors
@with_config_options(UpcycleCfg)
def upcycle(
    model: Annotated[str, typer.Argument(help="timm name (vit_small), hf-hub:org/name, .safetensors file, "
                                         "timm or transformers folder.", show_default=False)],
    arch: Annotated[str | None, typer.Option(help="timm architecture of a plain .safetensors file.",
                                             show_default=False)] = None,
    model_arg: Annotated[list[str] | None, typer.Option("--model-arg", "-m", metavar="KEY=VALUE", help="timm kwarg, "
                                                        "or num_classes of a transformers vision model (repeat).",
                                                        show_default=False)] = None,
    pretrained: Annotated[bool, typer.Option(help="Load pretrained weights for timm / hub names.")] = True,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: "
                                             "out/<model>-moe<E>k<K>).", show_default=False)] = None,
    tolerance: Annotated[float, typer.Option(help="Max allowed |dense - MoE| relative to max |dense|.")] =
        TOLERANCE,
    overwrite: OverwriteOpt = False,
    **fields,
) -> None:
    """Upcycle a dense model into a Mixture-of-Experts and check it computes what the dense one did."""
    with labelled(flag):
        cfg = UpcycleCfg(**fields)
    if out is not None:
        writable(out, overwrite)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder")
    source = load_source(model, pretrained=pretrained, arch=arch,
                         model_kwargs=parse_assignments(model_arg, "--model-arg"))
    name = source.architecture["name"]
    out = out or writable(Path("out") / f"{name}-moe{cfg.experts}k{cfg.k}", overwrite)
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
    # one line at 80 columns: "verify: max |dense - moe| = 3.725e-08 <= 1.0e-04 (probe batch, no capacity) ok"
    sign = "<=" if v.max_diff <= v.limit else ">"
    return f"verify: max |dense - moe| = {v.max_diff:.3e} {sign} {v.limit:.1e} (probe batch, no capacity) {status}"


def load_table(load: dict, method: str) -> Table:
    table = Table(title=f"initial expert load ({method} router, calibration tokens)")
    table.add_column("layer")
    table.add_column("share of tokens per expert")
    table.add_column("max / mean", justify="right")
    labels = layer_labels(load)
    for name, shares in load.items():
        table.add_row(labels[name], " ".join(f"{v:.2f}" for v in shares), f"{max(shares) * len(shares):.2f}")
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
