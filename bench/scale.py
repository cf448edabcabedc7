"""Training state per rank and step time of the parallel layouts: ddp, fsdp, expert parallelism (EP) and both.

An upcycled ViT-S/16 with 8 experts, top-2, trained with AdamW on random 224 px images, global batch fixed
(``--batch`` split over the ranks). Each layout runs on ``world`` gloo (CPU) or NCCL (``--device cuda``)
processes started by torch.multiprocessing, through moe-cli's own layout code (``moe_cli.train.parallel``).

State bytes: what each rank holds in parameters, gradients and optimizer state after a step (read from the
tensors, DTensors counted by their local shard; activations and FSDP's transiently gathered blocks excluded),
and of it the experts'. Step time: the median of ``--steps`` timed steps after one warm-up step, slowest rank.

    python bench/scale.py [--worlds 1 2 4] [--steps 3] [--batch 8] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAYOUTS = {"ddp": {}, "fsdp": {"parallel": "fsdp"}, "ep2": {"expert_parallel": 2},
           "fsdp+ep2": {"parallel": "fsdp", "expert_parallel": 2}}


def _local_bytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def _worker(rank: int, world: int, port: int, layout: str, args, out: str) -> None:
    import timm

    from moe_cli.models.surgery import upcycle
    from moe_cli.recipe import recipe_from_dict
    from moe_cli.runtime import Dist
    from moe_cli.train.optim import make_optimizer
    from moe_cli.train.parallel import plan

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dev = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    recipe = recipe_from_dict({"model": {"source": "vit_small_patch16_224"}, "data": {"name": "digits"},
                               "train": {"steps": 1, "batch_size": args.batch // world, **LAYOUTS[layout]}},
                              "bench")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", num_classes=100)
    model, _ = upcycle(model, experts=8, k=2)
    model = model.to(dev).train()
    par = plan(recipe, Dist(rank, world, rank), dev)
    train_model = par.wrap(model, dev)
    optimizer = make_optimizer(recipe, model)
    x = torch.randn(args.batch // world, 3, 224, 224, device=dev)
    y = torch.randint(0, 100, (args.batch // world,), device=dev)
    times = []
    for _ in range(args.steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(train_model(x), y)
        loss.backward()
        par.finish_grads(model)
        par.clip_grad_norm_(model, [p for p in model.parameters()], 1.0)
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if _ < args.steps:
            optimizer.zero_grad(set_to_none=True)
    experts = {id(p) for n, p in model.named_parameters() if ".experts." in n}
    state = {"total": 0, "experts": 0}
    for p in model.parameters():
        held = _local_bytes(p) + (_local_bytes(p.grad) if p.grad is not None else 0) + sum(
            _local_bytes(t) for t in optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor))
        state["total"] += held
        state["experts"] += held if id(p) in experts else 0
    step = statistics.median(times[1:])
    result = torch.tensor([state["total"], state["experts"], step], dtype=torch.float64)
    if world > 1:
        gathered = [torch.zeros_like(result) for _ in range(world)]
        dist.all_gather_object(gathered, result)
        dist.destroy_process_group()
    else:
        gathered = [result]
    if rank == 0:
        worst = torch.stack(gathered).max(0).values.tolist()
        with open(f"{out}/{layout}_{world}", "w") as f:
            f.write(" ".join(map(str, worst)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over the ranks)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="append the table to this Markdown file")
    args = ap.parse_args()
    rows = ["| processes | layout | state MB / rank | of it experts | step s |", "|---|---|---|---|---|"]
    tmp = tempfile.mkdtemp()
    for world in args.worlds:
        for layout in (["ddp"] if world == 1 else LAYOUTS):
            if LAYOUTS[layout].get("expert_parallel", 1) > world:
                continue
            mp.spawn(_worker, args=(world, _free_port(), layout, args, tmp), nprocs=world, join=True)
            total, experts, step = map(float, open(f"{tmp}/{layout}_{world}").read().split())
            name = "one process" if world == 1 else layout
            rows.append(f"| {world} | {name} | {total / 2**20:,.0f} | {experts / 2**20:,.0f} | {step:.2f} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))
    if args.out:
        where = torch.cuda.get_device_name() if args.device == "cuda" else \
            f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
        cmd = "python bench/scale.py " + " ".join(
            [f"--worlds {' '.join(map(str, args.worlds))}", f"--steps {args.steps}", f"--batch {args.batch}"]
            + ([f"--device {args.device}"] if args.device != "cpu" else []))
        with open(args.out, "a") as f:
            f.write(f"\n### Parallel layouts: state per rank and step time ({where}, torch {torch.__version__})\n\n"
                    f"Command: `{cmd}`\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
