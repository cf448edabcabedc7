"""Rerun every command behind a README results table, over three seeds, and print the tables in README form.

    python bench/readme_figures.py                 # all tables (the longest part: the MAE pretraining runs)
    python bench/readme_figures.py --only digits   # one group: digits, densify, mae, tokens, inits, features, lm
    python bench/readme_figures.py --seeds 0       # one seed (a quick look; the README states three)
    python bench/readme_figures.py --reuse --only inits   # the table again from the runs there (evals rerun)

Each run writes where its recipe says, with `-s<seed>` appended (runs/...-s1); the script reads summary.json /
report.json / `moe eval --json` and prints markdown: every figure that moves with the seed as mean ± standard
deviation over the seeds (`train.seed`; data and model sizes fixed), figures that do not (FLOPs, parameters) once.
CPU training is not bit-reproducible across processors, so a rerun elsewhere prints figures within about that
spread, not the same digits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)  # the README's figures: mean and spread over these (seed 0 is what the quick start prints)
CLOCK = {"s": 0.0}  # seconds of `moe` runs in the current group
REUSE = {"on": False}  # --reuse: a command whose outputs are all there is not run again


def outputs(args: tuple[str, ...]) -> list[str]:
    """The folders a `moe` command line writes: --out / -o, --set output=..., --set then.output=..."""
    found = [b for a, b in zip(args, args[1:], strict=False) if a in ("--out", "-o")]
    return found + [a.split("=", 1)[1] for a in args if a.startswith(("output=", "then.output="))]


def done(folder: str) -> bool:
    return any((ROOT / folder / name).exists() for name in ("final", "model.safetensors", "report.json"))


def moe(*args: str) -> None:
    """Run `moe ARGS` (the real CLI, quiet) from the repository root."""
    if REUSE["on"] and outputs(args) and all(done(o) for o in outputs(args)):
        return
    t0 = time.perf_counter()
    print("$ moe " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "moe_cli", "--quiet", *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    CLOCK["s"] += time.perf_counter() - t0


def evaluate(ckpt: str, metrics: str) -> dict:
    """`moe eval CKPT --metric METRICS --json`, parsed."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "moe_cli", "eval", ckpt, "--metric", metrics, "--json"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    CLOCK["s"] += time.perf_counter() - t0
    return json.loads(out)


def summary(run: str) -> dict:
    return json.loads((ROOT / run / "summary.json").read_text())


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def f4(x: float) -> str:
    return f"{x:.4f}"


def f3(x: float) -> str:
    return f"{x:.3f}"


def f2(x: float) -> str:
    return f"{x:.2f}"


def text(x: str) -> str:
    return x


Row = tuple[str, dict]  # (label, {column: value}) of one seed's run
Columns = list[tuple[str, Callable]]  # (column, formatter) after the label column


def cell(values: list, fmt: Callable) -> str:
    """One table cell over the seeds: 'mean ± std' where the figure moves with the seed, else the one value."""
    if len(set(values)) == 1:
        return "-" if values[0] is None else fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def table(title: str, label: str, columns: Columns, by_seed: dict[int, list[Row]]) -> None:
    seeds = list(by_seed)
    print(f"\n#### {title} (seeds {', '.join(map(str, seeds))}; all runs: {CLOCK['s'] / 60:.1f} min)\n")
    print("| " + " | ".join([label] + [c for c, _ in columns]) + " |")
    print("|" + "---|" * (1 + len(columns)))
    labels = [lab for lab, _ in by_seed[seeds[0]]]
    for i, lab in enumerate(labels):
        runs = [by_seed[s][i][1] for s in seeds]
        print("| " + " | ".join([lab] + [cell([r[c] for r in runs], fmt) for c, fmt in columns]) + " |")
    if len(seeds) > 1:  # what each run printed, to see how far one run may be from the mean
        for i, lab in enumerate(labels):
            print(f"per seed, {lab}: " + "; ".join(
                f"seed {s} " + " / ".join(fmt(by_seed[s][i][1][c]) for c, fmt in columns
                                           if fmt is not text and by_seed[s][i][1][c] is not None) for s in seeds))
    CLOCK["s"] = 0.0


def dense_digits(seed: int) -> str:
    """The quick start's dense digits ViT for this seed (trained once, reused by the digits tables)."""
    out = f"runs/digits-dense-s{seed}"
    if not (ROOT / out / "final").is_dir():
        moe("finetune", "recipes/digits-vit-tiny-dense.yaml", "--overwrite", "--set", f"train.seed={seed}",
            "--set", f"output={out}")
    return out


def upcycle_digits(seed: int, out: str, *extra: str) -> str:
    """`recipes/digits-upcycle-finetune.yaml` from this seed's dense ViT, into `out`-s<seed>."""
    run = f"{out}-s{seed}"
    moe("finetune", "recipes/digits-upcycle-finetune.yaml", "--overwrite", "--set", f"train.seed={seed}",
        "--set", f"model.source={dense_digits(seed)}/final", "--out", run, *extra)
    return run


def digits(seed: int) -> list[Row]:
    dense = summary(dense_digits(seed))
    up = summary(upcycle_digits(seed, "runs/digits-upcycle"))
    return [("dense ViT (depth 4, dim 192, patch 8 at 32 px), from scratch", {"steps": "600", **dense}),
            ("upcycled to 4 experts top-2 (all 4 FFNs), fine-tuned", {"steps": "+200", **up})]


def densify(seed: int) -> list[Row]:
    d2s = f"runs/digits-d2s-s{seed}"
    moe("densify-to-sparse", "recipes/digits-densify-to-sparse.yaml", "--overwrite", "--set", f"train.seed={seed}",
        "--set", f"model.source={dense_digits(seed)}/final", "--set", f"output={d2s}")
    top1 = upcycle_digits(seed, "runs/digits-top1-400", "--set", "model.upcycle.k=1", "--set",
                          "model.upcycle.normalize=false", "--set", "train.steps=400")
    dense400 = upcycle_digits(seed, "runs/digits-dense-400", "--set", "model.upcycle=null", "--set",
                              "train.steps=400")
    rows = []
    for label, run in (("dense ViT (start point)", dense_digits(seed)), ("dense ViT, +400 steps", dense400),
                       ("upcycled top-1, +400 steps", top1)):
        ev = evaluate(f"{run}/final", "accuracy,ce,flops")
        rows.append((label, {"accuracy": ev["accuracy"]["top1"], "ce": ev["ce"], "variation": None, **ev["flops"]}))
    report = json.loads((ROOT / d2s / "report.json").read_text())["stages"]
    for key, label in (("dense", "D2S stage 1 (dense MoE, 200 steps)"), ("distill", "D2S stage 2 (gates only, "
                       "100 steps)"), ("finetune", "D2S stage 3 (fine-tune, 100 steps)")):
        rows.append((label, report[key]))
    for _, r in rows:
        r["params"] = f"{r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M"
    return rows


def mae(seed: int) -> list[Row]:
    s = ("--set", f"train.seed={seed}", "--set", f"then.train.seed={seed}")
    pre, cls = f"runs/digits-mae-s{seed}", f"runs/digits-mae-classify-s{seed}"
    moe("finetune", "recipes/digits-mae.yaml", "--overwrite", *s, "--set", f"output={pre}", "--set",
        f"then.output={cls}")
    scratch = f"runs/digits-scratch-baseline-s{seed}"
    moe("finetune", "recipes/digits-vit-scratch-baseline.yaml", "--overwrite", "--set", f"train.seed={seed}",
        "--out", scratch)
    tok = ("--set", "mae.norm_pix_loss=true", "--set", "model.kwargs.global_pool=token")
    cls_tok = f"runs/digits-mae-tok-classify-s{seed}"
    moe("finetune", "recipes/digits-mae.yaml", "--overwrite", *s, *tok, "--set", f"output=runs/digits-mae-tok-s{seed}",
        "--set", f"then.output={cls_tok}", "--set", "then.model.kwargs.global_pool=token")
    scratch_tok = f"runs/digits-scratch-tok-s{seed}"
    moe("finetune", "recipes/digits-vit-scratch-baseline.yaml", "--overwrite", "--set", f"train.seed={seed}",
        "--set", "model.kwargs.global_pool=token", "--out", scratch_tok)
    return [(label, {"steps": "200", "mse": mse, **summary(run)}) for label, run, mse in (
        ("from scratch", scratch, None), ("from the MAE encoder (pixel targets)", cls, summary(pre)["mse"]),
        ("from scratch, class-token pooling", scratch_tok, None),
        ("from the MAE encoder, `norm_pix_loss: true`, class-token pooling", cls_tok,
         summary(f"runs/digits-mae-tok-s{seed}")["mse"]))]


def tokens(seed: int) -> list[Row]:
    s = ("--set", f"train.seed={seed}", "--set", f"then.train.seed={seed}")
    dense, up, more = (f"runs/tokens-maskgit{x}-s{seed}" for x in ("", "-moe", "-dense-more"))
    moe("finetune", "recipes/tokens-maskgit-synthetic.yaml", "--overwrite", *s, "--set", f"output={dense}", "--set",
        f"then.output={up}")
    moe("finetune", "recipes/tokens-maskgit-synthetic.yaml", "--overwrite", *s, "--set", f"output={dense}", "--set",
        "then.model={}", "--set", f"then.output={more}")
    return [("dense", {"steps": "1000", **summary(dense)}), ("dense, trained on", {"steps": "+200", **summary(more)}),
            ("upcycled to 4 experts top-2 (copied experts), trained on", {"steps": "+200", **summary(up)})]


def inits(seed: int) -> list[Row]:
    """Expert and router initialisations, each upcycled from the dense digits ViT and fine-tuned 200 steps."""
    runs = [("copy-upcycle, E4 k2 (`--init copy`)", "runs/init-copy", []),
            ("drop-upcycle r=0.5, E4 k2", "runs/init-drop", ["--set", "model.upcycle.init=drop"]),
            ("split E8 k2, router k-means", "runs/init-split-kmeans",
             ["--set", "model.upcycle={experts: 8, k: 2, init: split, router_init: kmeans, calib: digits}"]),
            ("split E8 k2, router random", "runs/init-split-random",
             ["--set", "model.upcycle={experts: 8, k: 2, init: split}"])]
    rows = [("dense ViT (start point)", "-", evaluate(f"{dense_digits(seed)}/final", "accuracy,flops"))]
    for label, out, extra in runs:
        rows.append((label, "+200", evaluate(f"{upcycle_digits(seed, out, *extra)}/final", "accuracy,flops")))
    merged = f"runs/init-copy-merged-s{seed}"
    moe("merge", f"runs/init-copy-s{seed}/final", "--experts", "1", "--out", merged, "--overwrite")
    rows.append(("copy-upcycle merged back to 1 expert (`moe merge --experts 1`)", "+200",
                 evaluate(merged, "accuracy,flops")))
    return [(label, {"steps": steps, "accuracy": ev["accuracy"]["top1"], **ev["flops"]}) for label, steps, ev in rows]


def features(seed: int) -> list[Row]:
    """Routing of current systems on digits: each upcycled from the dense digits ViT (capacity factor 1.0, so
    tokens can be dropped) and fine-tuned 200 steps."""
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
        ev = evaluate(f"{upcycle_digits(seed, out, '--set', f'model.upcycle={upcycle}', *extra)}/final",
                      "accuracy,routing,flops")
        layers = ev["routing"].values()
        cv = sum(statistics.pstdev(r["load"]) / statistics.mean(r["load"]) for r in layers) / len(layers)
        dropped = sum(r["dropped"] for r in layers) / len(layers)
        rows.append((label, {"accuracy": ev["accuracy"]["top1"], "cv": cv, "dropped": dropped, **ev["flops"]}))
    return rows


def lm(seed: int) -> list[Row]:
    """The tiny Llama on lm-synthetic: dense, dense trained as long again, and three upcycled variants."""
    dense = f"runs/lm-dense-s{seed}"
    moe("finetune", "recipes/lm-synthetic-llama-dense.yaml", "--overwrite", "--set", f"train.seed={seed}",
        "--out", dense)
    variants = {
        "dense Llama (2 layers, dim 64), from scratch": None,
        "dense, trained on (no MoE)": ("runs/lm-dense-more", ["--set", "model.upcycle=null"]),
        "copy-upcycled, E4 k2": ("runs/lm-copy", []),
        "copy + 1 shared expert with its sigmoid gate (Qwen2-MoE style), E4 k2": (
            "runs/lm-shared", ["--set", "model.upcycle.shared_experts=1", "--set", "model.upcycle.shared_gate=true"]),
        "split (MoEfication), E8 k2 (a quarter of the FFN per token)": (
            "runs/lm-split", ["--set", "model.upcycle={experts: 8, k: 2, init: split}"]),
    }
    rows = []
    for label, variant in variants.items():
        run = dense
        if variant is not None:
            run = f"{variant[0]}-s{seed}"
            moe("finetune", "recipes/lm-upcycle-finetune.yaml", "--overwrite", "--set", f"train.seed={seed}",
                "--set", f"model.source={dense}/final", "--out", run, *variant[1])
        ev = evaluate(f"{run}/final", "ce,perplexity,flops,throughput")
        rows.append((label, {"steps": "300" if variant is None else "+100", "ppl": ev["perplexity"], "ce": ev["ce"],
                             "active": f"{ev['flops']['params_active'] / 1e3:.1f}k",
                             "tok/s": ev["throughput"]["tokens_per_s"] / 1e3}))
    return rows


def _k(x: float) -> str:
    return f"{x:.0f}k"


GROUPS: dict[str, tuple[Callable, str, str, Columns]] = {
    "digits": (digits, "digits quick start", "model",
               [("steps", text), ("accuracy", pct), ("ce", f4)]),
    "densify": (densify, "dense-to-sparse on digits", "model",
                [("accuracy", pct), ("ce", f4), ("variation", f3), ("gflops_per_image", f4), ("params", text)]),
    "mae": (mae, "MAE -> classify", "classifier", [("steps", text), ("accuracy", pct), ("ce", f4), ("mse", f4)]),
    "tokens": (tokens, "masked tokens", "model", [("steps", text), ("ce", f4), ("accuracy", pct)]),
    "inits": (inits, "expert initialisations on digits", "model",
              [("steps", text), ("accuracy", pct), ("gflops_per_image", f4)]),
    "features": (features, "routing of current MoE systems on digits (capacity factor 1.0, +200 steps)", "model",
                 [("accuracy", pct), ("cv", f3), ("dropped", pct), ("gflops_per_image", f4)]),
    "lm": (lm, "causal LM on lm-synthetic", "model",
           [("steps", text), ("ppl", f2), ("ce", f4), ("active", text), ("tok/s", _k)]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--reuse", action="store_true", help="do not rerun a command whose outputs exist (tables again "
                    "from the runs there, evaluations rerun)")
    args = ap.parse_args()
    REUSE["on"] = args.reuse
    for name in args.only:
        run, title, label, columns = GROUPS[name]
        table(title, label, columns, {seed: run(seed) for seed in args.seeds})
        sys.stdout.flush()


if __name__ == "__main__":
    main()
