"""Benchmark the MoE layer's dispatch + experts against the ideal (the dense FFN on k*T tokens) and a naive
one-hot/where/index_add_ loop, forward and forward+backward, for ViT FFN shapes and the SwiGLU FFNs of LLMs.

    python bench/moe_layer.py                                  # full grid on CPU fp32, writes bench/RESULTS.md
    python bench/moe_layer.py --shapes vit_s --experts 4 --k 2 --routing balanced      # one row
    python bench/moe_layer.py --device cuda --dtype bf16 --shapes vit_b --experts 8 --k 2
    python bench/moe_layer.py --device cuda --dtype bf16 --shapes llm_1b --experts 8 --k 2 --tokens 8192   # LLM
    python bench/moe_layer.py --model vit_small_patch16_224 --device cuda --dtype bf16 --batch 128   # train step

Routing is fixed (balanced: token t -> experts t, t+1, ... mod E; skewed: Zipf(1.5) over experts) so the
expert loads are controlled for the dispatch + experts columns; the `layer` columns time the whole MoEMlp
(router, dispatch, experts; routing from its random router) on the same tokens. Each figure is the median of
--repeats timed runs after warm-up; ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp, SwiGLU

from moe_cli.moe.config import Impl
from moe_cli.moe.dispatchers import DISPATCHERS
from moe_cli.moe.layer import MoEMlp
from moe_cli.moe.routing import Routing
from moe_cli.moe.upcycling import from_dense

# (model dim, FFN hidden, FFN): the ViT GELU MLPs, and the SwiGLU MLPs of 1-2B and 7-8B language models
SHAPES = {"vit_s": (384, 1536, "mlp"), "vit_b": (768, 3072, "mlp"), "vit_l": (1024, 4096, "mlp"),
          "llm_1b": (2048, 8192, "swiglu"), "llm_8b": (4096, 14336, "swiglu")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def routing(kind: str, T: int, E: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if kind == "balanced":
        expert = (torch.arange(T)[:, None] + torch.arange(k)[None, :]) % E
    else:
        p = 1.0 / torch.arange(1, E + 1).float() ** 1.5
        expert = torch.stack([torch.multinomial(p, k, replacement=False, generator=gen) for _ in range(T)])
    weight = torch.rand(T, k, generator=gen).softmax(-1)
    return expert.to(device), weight.to(device)


def naive(x, expert, weight, ex):
    """The pattern most public MoE blocks use: a mask per expert, torch.where, index_add_."""
    out = torch.zeros(x.shape[0], ex.w2.shape[1], dtype=x.dtype, device=x.device)
    for e in range(ex.num_experts):
        tok, slot = torch.where(expert == e)
        if tok.numel() == 0:
            continue
        b1, b2 = (ex.b1[e] if ex.b1 is not None else None), (ex.b2[e] if ex.b2 is not None else None)
        h = F.linear(x[tok], ex.w1[e], b1)
        h = ex.act(F.linear(x[tok], ex.wg[e])) * h if ex.glu else ex.act(h)
        y = F.linear(h, ex.w2[e], b2) * weight[tok, slot, None].to(x.dtype)
        out = out.index_add(0, tok, y)
    return out


def timed_interleaved(fns: dict, backward: bool, repeats: int, sync) -> dict[str, float]:
    """Median seconds per call of each fn; the fns take turns in every repeat so drift hits all alike."""
    def once(fn):
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
        sync()

    for fn in fns.values():
        once(fn)
        once(fn)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            once(fn)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_one(shape, E, k, kind, T, device, dtype, repeats, impl):
    D, H, ffn = SHAPES[shape]
    torch.manual_seed(0)
    make = (lambda: Mlp(D, H)) if ffn == "mlp" else (lambda: SwiGLU(D, H, bias=False))
    moe = from_dense(make(), E, k, impl=impl).to(device)
    ex = moe.experts
    dense = make().to(device)
    expert, weight = routing(kind, T, E, k, device)
    x = torch.randn(T, D, device=device, requires_grad=True)
    xk = torch.randn(k * T, D, device=device, requires_grad=True)
    amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type,
                                                                                                 enabled=False)
    with amp:
        resolved = moe.dispatcher(x).name
    empty = torch.empty(0, device=device)
    routed = Routing(expert, weight, empty, empty)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn):
        def call():
            with amp:
                return fn()
        return call

    fns = {
        "ideal": run(lambda: dense(xk)),
        "moe": run(lambda: DISPATCHERS[resolved](x, routed, ex)[0]),
        "layer": run(lambda: moe(x)),
        "naive": run(lambda: naive(x, expert, weight, ex)),
    }
    res = {}
    for suffix, backward in (("fwd", False), ("fwdbwd", True)):
        for name, t in timed_interleaved(fns, backward, repeats, sync).items():
            res[f"{name}_{suffix}"] = t
    return resolved, res


def bench_model(name: str, E: int, k: int, batch: int, img: int, device, dtype, steps: int, impl: str) -> dict:
    """Images/s of whole training steps (forward, backward, AdamW) of the dense timm model and its upcycled MoE."""
    from moe_cli.models.surgery import upcycle
    from moe_cli.moe.recorder import RoutingRecorder

    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False, img_size=img, num_classes=100).to(device)
    moe, _ = upcycle(copy.deepcopy(dense), experts=E, k=k, impl=impl)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    for label, model in (("dense", dense), ("moe", moe)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        rec = RoutingRecorder(model, aux=True)

        def step(model=model, opt=opt, rec=rec):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), rec:
                loss = F.cross_entropy(model(x).float(), y)
                aux, _ = rec.aux_loss(0.01, 0.001)
                loss = loss + aux if aux is not None else loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        out[label] = batch * steps / (time.perf_counter() - t0)
        if device.type == "cuda":
            out[f"{label}_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            torch.cuda.reset_peak_memory_stats(device)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["vit_s", "vit_b"], choices=list(SHAPES))
    ap.add_argument("--experts", nargs="+", type=int, default=[4, 8, 16])
    ap.add_argument("--k", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--routing", nargs="+", default=["balanced", "skewed"], choices=["balanced", "skewed"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--impl", default="auto", choices=[i.value for i in Impl])
    ap.add_argument("--out", default=None, help="Markdown file to append the table to (e.g. bench/RESULTS.md).")
    ap.add_argument("--model", default=None, help="timm model: time whole training steps, dense vs upcycled.")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    if args.model:
        return model_mode(args, argv, device, dtype, name)
    header = ("| shape | E | k | routing | path | fwd ms | fwd / ideal | fwd / naive | fwd+bwd ms | fwd+bwd / ideal "
              "| fwd+bwd / naive | layer fwd+bwd ms | layer / ideal |")
    lines = [header, "|" + "---|" * 13]
    print(header)
    for shape in args.shapes:
        for E in args.experts:
            for k in args.k:
                for kind in args.routing:
                    path, r = bench_one(shape, E, k, kind, args.tokens, device, dtype, args.repeats, args.impl)
                    row = (f"| {shape} | {E} | {k} | {kind} | {path} | {r['moe_fwd'] * 1e3:.1f} | "
                           f"{r['moe_fwd'] / r['ideal_fwd']:.3f} | {r['moe_fwd'] / r['naive_fwd']:.3f} | "
                           f"{r['moe_fwdbwd'] * 1e3:.1f} | {r['moe_fwdbwd'] / r['ideal_fwdbwd']:.3f} | "
                           f"{r['moe_fwdbwd'] / r['naive_fwdbwd']:.3f} | {r['layer_fwdbwd'] * 1e3:.1f} | "
                           f"{r['layer_fwdbwd'] / r['ideal_fwdbwd']:.3f} |")
                    print(row, flush=True)
                    lines.append(row)
    if args.out:
        cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
        with open(args.out, "a") as f:
            f.write(f"\n### {name}, {args.dtype}, T={args.tokens} tokens, torch {torch.__version__}\n\n"
                    f"Command: `{cmd}`\n\n" + "\n".join(lines) + "\n")


def model_mode(args, argv, device, dtype, name) -> None:
    header = "| model | E | k | batch | img | dense img/s | MoE img/s | MoE / dense | path |"
    lines = [header, "|" + "---|" * 9]
    print(header)
    for E in args.experts:
        for k in args.k:
            r = bench_model(args.model, E, k, args.batch, args.img_size, device, dtype, args.steps, args.impl)
            probe = torch.empty(1, device=device, dtype=dtype)
            path = MoEMlp(8, 8, num_experts=2, k=1, impl=args.impl).to(device).dispatcher(probe).name
            row = (f"| {args.model} | {E} | {k} | {args.batch} | {args.img_size} | {r['dense']:.1f} | {r['moe']:.1f} | "
                   f"{r['moe'] / r['dense']:.3f} | {path} |")
            print(row, flush=True)
            lines.append(row)
    if args.out:
        cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
        with open(args.out, "a") as f:
            f.write(f"\n### Training step, {name}, {args.dtype}, torch {torch.__version__}\n\n"
                    f"Command: `{cmd}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
