"""Rerun every command behind a README results table and print the tables in README form.

    python bench/readme_figures.py                 # all tables (the longest part: the MAE pretraining runs)
    python bench/readme_figures.py --only digits   # one group: digits, densify, mae, tokens, inits, features, lm

Each run writes where its recipe says (runs/...); the script reads summary.json / report.json and prints
markdown. Training is deterministic on CPU with the recipes' seeds, so a rerun prints the same figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def moe(*args: str) -> float:
    """Run `moe ARGS` (the real CLI, quiet) from the repository root; returns the seconds it took."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "moe_cli", "--quiet", *args]
    print("$ moe " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def summary(run: str) -> dict:
    return json.loads((ROOT / run / "summary.json").read_text())


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


SEEDS = (0, 1, 2)  # the README's quick-start figures: mean and spread over these (seed 0 is what it prints)


def spread(values: list[float], fmt) -> str:
    """'mean ± std (min-max)' of one figure over the seeds."""
    import statistics

    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}" if len(values) > 1 else fmt(values[0])


def digits() -> None:
    t, dense, up = 0.0, [], []
    for seed in SEEDS:
        d_out, u_out = f"runs/digits-dense-s{seed}", f"runs/digits-upcycle-s{seed}"
        t += moe("finetune", "recipes/digits-vit-tiny-dense.yaml", "--overwrite", "--set", f"train.seed={seed}",
                 "--set", f"output={d_out}")
        t += moe("finetune", "recipes/digits-upcycle-finetune.yaml", "--overwrite", "--set", f"train.seed={seed}",
                 "--set", f"output={u_out}", "--set", f"model.source={d_out}/final")
        dense.append(summary(d_out))
        up.append(summary(u_out))
    print(f"\n#### digits quick start (seeds {', '.join(map(str, SEEDS))}; all runs: {t / 60:.1f} min)\n")
    print("| model | steps | val accuracy | val CE |\n|---|---|---|---|")
    for label, steps, runs in (("dense ViT (depth 4, dim 192, patch 8 at 32 px), from scratch", "600", dense),
                               ("upcycled to 4 experts top-2 (all 4 FFNs), fine-tuned", "+200", up)):
        print(f"| {label} | {steps} | {spread([r['accuracy'] for r in runs], pct)} | "
              f"{spread([r['ce'] for r in runs], lambda x: f'{x:.4f}')} |")
    for seed, d, u in zip(SEEDS, dense, up, strict=True):
        print(f"seed {seed}: dense {pct(d['accuracy'])} / {d['ce']:.4f}, upcycled {pct(u['accuracy'])} / {u['ce']:.4f}")


def densify() -> None:
    if not (ROOT / "runs/digits-dense/final").is_dir():
        moe("finetune", "recipes/digits-vit-tiny-dense.yaml", "--overwrite")
    moe("densify-to-sparse", "recipes/digits-densify-to-sparse.yaml", "--overwrite")
    moe("finetune", "recipes/digits-upcycle-finetune.yaml", "--overwrite", "--set", "model.upcycle.k=1", "--set",
        "model.upcycle.normalize=false", "--set", "train.steps=400", "--out", "runs/digits-top1-400")
    moe("finetune", "recipes/digits-upcycle-finetune.yaml", "--overwrite", "--set", "model.upcycle=null", "--set",
        "train.steps=400", "--out", "runs/digits-dense-400")
    report = json.loads((ROOT / "runs/digits-d2s/report.json").read_text())["stages"]
    rows = []
    for label, run in (("dense ViT (start point)", "runs/digits-dense"), ("dense ViT, +400 steps",
                                                                        "runs/digits-dense-400"),
                       ("upcycled top-1, +400 steps", "runs/digits-top1-400")):
        ev = json.loads(subprocess.run([sys.executable, "-m", "moe_cli", "eval", f"{run}/final", "--metric",
                                        "accuracy,ce,flops", "--json"], cwd=ROOT, check=True, capture_output=True,
                                       text=True).stdout)
        f = ev["flops"]
        rows.append(f"| {label} | {pct(ev['accuracy']['top1'])} | {ev['ce']:.4f} | - | {f['gflops_per_image']:.4f} | "
                    f"{f['params_total'] / 1e6:.2f}M / {f['params_active'] / 1e6:.2f}M |")
    names = {"dense": "D2S stage 1 (dense MoE, 200 steps)", "distill": "D2S stage 2 (gates only, 100 steps)",
             "finetune": "D2S stage 3 (fine-tune, 100 steps)"}
    for key, label in names.items():
        r = report[key]
        rows.append(f"| {label} | {pct(r['accuracy'])} | {r['ce']:.4f} | {r['variation']:.3f} | "
                    f"{r['gflops_per_image']:.4f} | {r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M |")
    print("\n#### dense-to-sparse on digits\n")
    print("| model | val accuracy | val CE | batch-wise variation | GFLOPs/image | params total / active |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


def mae() -> None:
    t = moe("finetune", "recipes/digits-mae.yaml", "--overwrite")
    moe("finetune", "recipes/digits-vit-scratch-baseline.yaml", "--overwrite")
    pre, cls, scratch = summary("runs/digits-mae"), summary("runs/digits-mae-classify"), \
        summary("runs/digits-scratch-baseline")
    tok = ("--set", "mae.norm_pix_loss=true", "--set", "model.kwargs.global_pool=token")
    moe("finetune", "recipes/digits-mae.yaml", "--overwrite", *tok, "--set", "output=runs/digits-mae-tok",
        "--set", "then.output=runs/digits-mae-tok-classify", "--set", "then.model.kwargs.global_pool=token")
    moe("finetune", "recipes/digits-vit-scratch-baseline.yaml", "--overwrite", "--set",
        "model.kwargs.global_pool=token", "--out", "runs/digits-scratch-tok")
    cls_tok, scratch_tok = summary("runs/digits-mae-tok-classify"), summary("runs/digits-scratch-tok")
    print(f"\n#### MAE -> classify (pretraining + classifier: {t / 60:.1f} min; MAE val MSE {pre['mse']:.4f})\n")
    print("| classifier | classifier steps | val accuracy | val CE |\n|---|---|---|---|")
    for label, s in (("from scratch", scratch), ("from the MAE encoder (pixel targets)", cls),
                     ("from scratch, class-token pooling", scratch_tok),
                     ("from the MAE encoder, `norm_pix_loss: true`, class-token pooling", cls_tok)):
        print(f"| {label} | 200 | {pct(s['accuracy'])} | {s['ce']:.4f} |")


def tokens() -> None:
    t = moe("finetune", "recipes/tokens-maskgit-synthetic.yaml", "--overwrite")
    dense, moe_run = summary("runs/tokens-maskgit"), summary("runs/tokens-maskgit-moe")
    moe("finetune", "recipes/tokens-maskgit-synthetic.yaml", "--overwrite", "--set", "then.model={}", "--set",
        "then.output=runs/tokens-maskgit-dense-more")
    more = summary("runs/tokens-maskgit-dense-more")
    print(f"\n#### masked tokens (dense + upcycled chain: {t / 60:.1f} min)\n")
    print("| model | steps | masked-token CE | masked-token accuracy |\n|---|---|---|---|")
    print(f"| dense | 1000 | {dense['ce']:.4f} | {pct(dense['accuracy'])} |")
    print(f"| dense, trained on | +200 | {more['ce']:.4f} | {pct(more['accuracy'])} |")
    print(f"| upcycled to 4 experts top-2 (copied experts), trained on | +200 | {moe_run['ce']:.4f} | "
          f"{pct(moe_run['accuracy'])} |")


def inits() -> None:
    """Expert and router initialisations, each upcycled from the dense digits ViT and fine-tuned 200 steps."""
    if not (ROOT / "runs/digits-dense/final").is_dir():
        moe("finetune", "recipes/digits-vit-tiny-dense.yaml", "--overwrite")
    runs = [("copy-upcycle, E4 k2 (`--init copy`)", "runs/init-copy", []),
            ("drop-upcycle r=0.5, E4 k2", "runs/init-drop", ["--set", "model.upcycle.init=drop"]),
            ("split E8 k2, router k-means", "runs/init-split-kmeans",
             ["--set", "model.upcycle={experts: 8, k: 2, init: split, router_init: kmeans, calib: digits}"]),
            ("split E8 k2, router random", "runs/init-split-random",
             ["--set", "model.upcycle={experts: 8, k: 2, init: split}"])]
    rows = []
    dense = _eval("runs/digits-dense/final")
    rows.append(f"| dense ViT (start point) | - | {pct(dense['accuracy']['top1'])} | "
                f"{dense['flops']['gflops_per_image']:.4f} |")
    for label, out, extra in runs:
        moe("finetune", "recipes/digits-upcycle-finetune.yaml", "--overwrite", "--out", out, *extra)
        ev = _eval(f"{out}/final")
        rows.append(f"| {label} | +200 | {pct(ev['accuracy']['top1'])} | {ev['flops']['gflops_per_image']:.4f} |")
    moe("merge", "runs/init-copy/final", "--experts", "1", "--out", "runs/init-copy-merged", "--overwrite")
    ev = _eval("runs/init-copy-merged")
    rows.append(f"| copy-upcycle merged back to 1 expert (`moe merge --experts 1`) | +200 | "
                f"{pct(ev['accuracy']['top1'])} | {ev['flops']['gflops_per_image']:.4f} |")
    print("\n#### expert initialisations on digits\n")
    print("| model | steps | val accuracy | GFLOPs/image (active) |\n|---|---|---|---|")
    print("\n".join(rows))


def features() -> None:
    """Routing of current systems on digits: each upcycled from the dense digits ViT (capacity factor 1.0, so
    tokens can be dropped) and fine-tuned 200 steps."""
    if not (ROOT / "runs/digits-dense/final").is_dir():
        moe("finetune", "recipes/digits-vit-tiny-dense.yaml", "--overwrite")
    cf = "capacity_factor: 1.0"
    runs = [("E4 k2, load-balance loss", "runs/feat-lb", f"{{experts: 4, k: 2, {cf}}}", []),
            ("E4 k2, aux-loss-free bias (u = 0.001), no LB loss", "runs/feat-auxfree",
             f"{{experts: 4, k: 2, {cf}, balance: aux_free, bias_update: 0.001}}", ["--set", "moe.load_balance=0"]),
            ("1 shared + E4 k1 (`--shared-experts 1`)", "runs/feat-shared", f"{{experts: 4, k: 1, {cf}, "
             "shared_experts: 1}", []),
            ("E4 k2, sigmoid gate (`sigmoid_topk`)", "runs/feat-sigmoid", f"{{experts: 4, k: 2, {cf}, "
             "gate: sigmoid_topk}", [])]
    rows = []
    for label, out, upcycle, extra in runs:
        moe("finetune", "recipes/digits-upcycle-finetune.yaml", "--overwrite", "--out", out, "--set",
            f"model.upcycle={upcycle}", *extra)
        ev = json.loads(subprocess.run([sys.executable, "-m", "moe_cli", "eval", f"{out}/final", "--metric",
                                        "accuracy,routing,flops", "--json"], cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout)
        layers = ev["routing"].values()
        cv = sum(statistics.pstdev(r["load"]) / statistics.mean(r["load"]) for r in layers) / len(layers)
        dropped = sum(r["dropped"] for r in layers) / len(layers)
        rows.append(f"| {label} | {pct(ev['accuracy']['top1'])} | {cv:.3f} | {pct(dropped)} | "
                    f"{ev['flops']['gflops_per_image']:.4f} |")
    print("\n#### routing of current MoE systems on digits (capacity factor 1.0, +200 steps)\n")
    print("| model | val accuracy | load CV (end) | dropped tokens | GFLOPs/image |\n|---|---|---|---|---|")
    print("\n".join(rows))


def lm() -> None:
    """The tiny Llama on lm-synthetic: dense, dense trained as long again, and three upcycled variants."""
    t = moe("finetune", "recipes/lm-synthetic-llama-dense.yaml", "--overwrite")
    variants = {
        "dense Llama (2 layers, dim 64), from scratch": ("runs/lm-dense", None),
        "dense, trained on (no MoE)": ("runs/lm-dense-more", ["--set", "model.upcycle=null"]),
        "copy-upcycled, E4 k2": ("runs/lm-copy", []),
        "copy + 1 shared expert with its sigmoid gate (Qwen2-MoE style), E4 k2": (
            "runs/lm-shared", ["--set", "model.upcycle.shared_experts=1", "--set", "model.upcycle.shared_gate=true"]),
        "split (MoEfication), E8 k2 (a quarter of the FFN per token)": (
            "runs/lm-split", ["--set", "model.upcycle={experts: 8, k: 2, init: split}"]),
    }
    rows = []
    for label, (run, extra) in variants.items():
        if extra is not None:
            t += moe("finetune", "recipes/lm-upcycle-finetune.yaml", "--overwrite", "--out", run, *extra)
        ev = json.loads(subprocess.run([sys.executable, "-m", "moe_cli", "eval", f"{run}/final", "--metric",
                                        "ce,perplexity,flops,throughput", "--json"], cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout)
        steps = "300" if extra is None else "+100"
        rows.append(f"| {label} | {steps} | {ev['perplexity']:.2f} | {ev['ce']:.4f} | "
                    f"{ev['flops']['params_active'] / 1e3:.1f}k | {ev['throughput']['tokens_per_s'] / 1e3:.0f}k |")
    print(f"\n#### causal LM on lm-synthetic (all runs: {t / 60:.1f} min)\n")
    print("| model | steps | val perplexity | val CE | active params / token | tokens/s (eval, CPU) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


def _eval(ckpt: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "moe_cli", "eval", ckpt, "--metric", "accuracy,flops", "--json"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


GROUPS = {"digits": digits, "densify": densify, "mae": mae, "tokens": tokens, "inits": inits, "features": features,
          "lm": lm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    args = ap.parse_args()
    for name in args.only:
        GROUPS[name]()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
