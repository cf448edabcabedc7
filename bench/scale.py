"""Training state per rank and step time of the parallel layouts: ddp, fsdp, expert parallelism (EP) and both.

An upcycled ViT-S/16 with 8 experts, top-2, trained with AdamW on random 224 px images, global batch fixed
(``--batch`` split over the ranks). Each layout runs on ``world`` gloo (CPU) or NCCL (``--device cuda``)
processes started by torch.multiprocessing, through moe-cli's own layout code (``moe_cli.train.parallel``).

State bytes: what each rank holds in parameters, gradients and optimizer state after a step (read from the
tensors, DTensors counted by their local shard; activations and FSDP's transiently gathered blocks excluded),
and of it the experts'. Step time: the median of ``--steps`` timed steps after one warm-up step, slowest rank.

    python bench/scale.py [--worlds 1 2 4] [--steps 3] [--batch 8] [--out bench/RESULTS.md]

``--memory``: peak resident memory per rank, model construction included, through `moe finetune`'s own loop: a
dense ViT-B/16 moe-cli checkpoint upcycled to 8 experts top-2 in every block (about 2 GB of fp32 weights) and
trained one step under fsdp on 1, 2 and 4 gloo processes (built on the meta device, each rank reading its shards),
one row with activation checkpointing, and ddp (the whole model on every rank) for comparison, and a bare process
(torch, timm and moe-cli imported, nothing built). "start-up" is the peak before the first step (model built,
sharded, optimizer made), then after the first step (AdamW state made), then at the end (last/ and final/
written as 200 MB shards, each file by one rank from the ranks' shards).

    python bench/scale.py --memory [--out bench/RESULTS.md]
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


class _Peaks:
    """A loop reporter that writes this rank's peak RSS when training starts and when it ends."""

    def __init__(self, path: str):
        self.path, self.start_peak, self.step_peak = path, 0, 0

    def start(self, total_steps: int, step: int) -> None:
        self.start_peak = _peak_rss()

    def log(self, record: dict) -> None:
        self.step_peak = self.step_peak or _peak_rss()  # the first step, before the final checkpoint is gathered

    def close(self) -> None:
        with open(self.path, "w") as f:
            f.write(f"{self.start_peak} {self.step_peak} {_peak_rss()}")

    def evaluated(self, record: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def warning(self, text: str) -> None: ...


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _memory_worker(rank: int, world: int, port: int, recipe: str, out: str) -> None:
    from moe_cli.recipe import load_recipe
    from moe_cli.train.loop import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="bench")
    torch.set_num_threads(1)
    try:
        train(load_recipe(recipe), device="cpu", reporter=_Peaks(f"{out}.{rank}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def memory(args) -> list[str]:
    """Peak RSS per rank (start-up and after one step) of the layouts in the module docstring."""
    import numpy as np
    import timm
    import yaml
    from PIL import Image

    from moe_cli.io.checkpoint import Checkpoint, save
    from moe_cli.io.sources import model_data_config

    tmp = tempfile.mkdtemp()
    torch.manual_seed(0)
    dense = timm.create_model("vit_base_patch16_224", num_classes=2)
    save(Checkpoint(dense, {"name": "vit_base_patch16_224", "kwargs": {"num_classes": 2}}, source="bench",
                    data_config=model_data_config(dense)), f"{tmp}/dense")
    del dense
    rng = np.random.default_rng(0)
    for c in ("a", "b"):  # a tiny image folder: the run's evaluation costs next to nothing
        os.makedirs(f"{tmp}/imgs/{c}")
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(f"{tmp}/imgs/{c}/{i}.png")
    rows = ["| processes | layout | peak RSS / rank: start-up | after the first step | at the end (last/, final/ "
            "written) | upcycled weights |", "|---|---|---|---|---|---|"]
    runs = [(world, "fsdp", {"parallel": "fsdp"}) for world in args.worlds] + \
        [(2, "fsdp + activation checkpointing", {"parallel": "fsdp", "activation_checkpointing": "blocks"}),
         (2, "ddp (whole model per rank)", {})]
    base_rss = _bare_process_rss()
    rows.append(f"| 1 | bare process (imports only) | {base_rss / 2**30:.2f} GiB | - | - | - |")
    import shutil

    for world, name, layout in runs:
        recipe = f"{tmp}/r_{world}_{len(rows)}.yaml"
        with open(recipe, "w") as f:
            yaml.safe_dump({"model": {"source": f"{tmp}/dense", "upcycle": {"experts": 8, "k": 2}},
                            "data": {"name": "", "root": f"{tmp}/imgs"},
                            "train": {"steps": 1, "batch_size": 2, "log_every": 1, "max_shard_size": "200MB",
                                      **layout},
                            "output": f"{tmp}/run_{world}_{len(rows)}"}, f)
        base = f"{tmp}/peak_{world}_{len(rows)}"
        mp.spawn(_memory_worker, args=(world, _free_port(), recipe, base), nprocs=world, join=True)
        peaks = [tuple(map(int, open(f"{base}.{r}").read().split())) for r in range(world)]
        shutil.rmtree(f"{tmp}/run_{world}_{len(rows)}")  # final/ and last/ of a 2 GB model: gigabytes each
        start, step, end = (max(p[i] for p in peaks) / 2**30 for i in range(3))
        rows.append(f"| {world} | {name} | {start:.2f} GiB | {step:.2f} GiB | {end:.2f} GiB | "
                    f"{_upcycled_bytes() / 2**30:.2f} GiB |")
        print(rows[-1], flush=True)
    shutil.rmtree(tmp)
    return rows


def _bare_process_rss() -> int:
    import subprocess
    import sys

    code = ("import resource, torch, timm, moe_cli.train.loop; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _upcycled_bytes() -> int:
    """fp32 bytes of ViT-B/16 with 8 copies of every FFN (the model the memory rows train)."""
    import timm

    with torch.device("meta"):
        m = timm.create_model("vit_base_patch16_224", num_classes=2)
    ffn = sum(p.numel() for n, p in m.named_parameters() if ".mlp." in n)
    return 4 * (sum(p.numel() for p in m.parameters()) + 7 * ffn)


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
    ap.add_argument("--memory", action="store_true", help="peak RSS per rank, construction included (see above)")
    args = ap.parse_args()
    if args.memory:
        rows = memory(args)
        print("\n".join(rows))
        if args.out:
            cmd = f"python bench/scale.py --memory --worlds {' '.join(map(str, args.worlds))}"
            where = f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
            with open(args.out, "a") as f:
                f.write(f"\n### Peak memory per rank, model construction included ({where}, torch "
                        f"{torch.__version__})\n\nCommand: `{cmd}`\n\n" + "\n".join(rows) + "\n")
        return
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
