"""Steady-state images/s of the shared training loop (`moe_cli.train.loop.train`, what `moe finetune` runs)
against a bare loop over the same model, loader and optimizer (forward, loss + MoE aux losses, backward, step).

    python bench/loop_overhead.py                                   # digits, upcycled ViT-tiny, CPU
    python bench/loop_overhead.py --device cuda --precision bf16 --batch 256 --steps 300

The loop's figure is the mean of its logged `speed` (images/s) windows after the first (start-up excluded); the
bare loop is timed over the same steps after the same warm-up. Each runs twice,
alternating, and the best of each counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_cli.data.loaders import ResumableSampler, build_datasets, make_loader
from moe_cli.moe.recorder import RoutingRecorder
from moe_cli.recipe import recipe_from_dict
from moe_cli.runtime import Precision, autocast
from moe_cli.train.build import build_model
from moe_cli.train.loop import prefetch, train
from moe_cli.train.optim import make_optimizer


def recipe(args, out: str):
    return recipe_from_dict({
        "model": {"source": "vit_tiny_patch16_224", "pretrained": False,
                  "kwargs": {"img_size": args.img_size, "patch_size": 8, "depth": args.depth, "num_classes": 10},
                  "upcycle": {"experts": args.experts, "k": args.k}},
        "data": {"name": "digits"},
        "train": {"steps": args.steps, "batch_size": args.batch, "log_every": args.log_every, "clip": 1.0,
                  "precision": args.precision},
        "output": out,
    }, "bench")


def loop_img_s(args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        res = train(recipe(args, tmp), device=args.device)
    windows = [h["speed"] for h in res.history if h["split"] == "train"][1:]
    return sum(windows) / len(windows)


def bare_img_s(args) -> float:
    r = recipe(args, "unused")
    dev = torch.device(args.device)
    torch.manual_seed(0)
    ckpt = build_model(r)
    model = ckpt.model.to(dev).train()
    task = r.make_task()
    train_ds, _ = build_datasets(r.data, model)
    named = list(model.named_parameters())
    opt = make_optimizer(r, model)
    rec = RoutingRecorder(model, aux=True).__enter__()  # as the loop: listening for the whole run
    sampler = ResumableSampler(train_ds, seed=0)
    steps, done, t0, seen = args.steps, 0, None, 0
    epoch = 0
    while done < steps:
        sampler.set_position(epoch, 0)
        for batch in prefetch(make_loader(train_ds, args.batch, sampler, 0, dev), dev):
            with autocast(dev, args.precision):
                loss, _ = task.loss(model, batch)
                aux, _ = rec.aux_loss(0.01, 0.001)
                loss = loss + aux
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == args.log_every:  # the same warm-up the loop's first window covers
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0, seen = time.perf_counter(), 0
            elif t0 is not None:
                seen += len(batch[0])
            if done >= steps:
                break
        epoch += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=list(Precision))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--out", default=None, help="Markdown file to append the result to (e.g. bench/RESULTS.md).")
    args = ap.parse_args(argv)
    loop, bare = [], []
    for _ in range(2):
        loop.append(loop_img_s(args))
        bare.append(bare_img_s(args))
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    row = f"| {max(loop):.1f} | {max(bare):.1f} | {max(loop) / max(bare):.3f} |"
    table = "| moe finetune img/s | bare loop img/s | loop / bare |\n|---|---|---|\n" + row
    print(table)
    if args.out:
        cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
        cfg = dataclasses.asdict(recipe(args, "x").train)
        with open(args.out, "a") as f:
            f.write(f"\n### Loop overhead, {name}, {args.precision}, torch {torch.__version__}\n\n"
                    f"Command: `{cmd}` (upcycled ViT-tiny depth {args.depth}, E={args.experts} k={args.k}, "
                    f"{args.img_size} px digits, batch {cfg['batch_size']}, {args.steps} steps)\n\n{table}\n")


if __name__ == "__main__":
    main()
