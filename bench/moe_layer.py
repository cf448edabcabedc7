"""Benchmark the MoE layer's dispatch + experts against the ideal (the dense FFN on k*T tokens) and a naive
one-hot/where/index_add_ loop, forward and forward+backward, for ViT FFN shapes and the SwiGLU FFNs of LLMs.

    python bench/moe_layer.py                                  # full grid on CPU fp32, writes bench/RESULTS.md
    python bench/moe_layer.py --shapes vit_s --experts 4 --k 2 --routing balanced      # one row
    python bench/moe_layer.py --device cuda --dtype bf16 --shapes vit_b --experts 8 --k 2
    python bench/moe_layer.py --device cuda --dtype bf16 --shapes llm_1b --experts 8 --k 2 --tokens 8192   # LLM
    python bench/moe_layer.py --model vit_small_patch16_224 --device cuda --dtype bf16 --batch 128   # train step
    python bench/moe_layer.py --sweep E        # ratio to the ideal for E = 4..128 (k 2, T 2048), with peers
    python bench/moe_layer.py --sweep T        # T = 512..8192 at E 8 k 2;  --sweep k: k 1..8 at E 64
    python bench/moe_layer.py --sweep k --experts 64 --hidden 96    # fine-grained experts (H 96 each)
    python bench/moe_layer.py --host-memory    # training steps of an E 128 layer: glibc default vs reuse
    python bench/moe_layer.py --gemm-floor     # the GEMMs of many experts vs one dense GEMM: where the time goes

`--sweep E|T|k` times forward+backward of the dispatch + experts of every moe-cli dispatcher that runs here,
`auto`'s choice, and the peers side by side, each as a ratio to the ideal measured in the same run: transformers'
experts integration (`grouped_mm_experts_forward`, the code behind its Mixtral / Qwen-MoE blocks; the same
weights), torchtitan's `GroupedExperts` where torchtitan is installed (SwiGLU FFNs only; it computes in bf16),
and the naive loop. Parameter gradients are reset to None after each backward, as an optimizer's zero_grad does.

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
from moe_cli.runtime import reuse_freed_memory

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


def timed_interleaved(fns: dict, backward: bool, repeats: int, sync, reset=None) -> dict[str, float]:
    """Median seconds per call of each fn; the fns take turns in every repeat so drift hits all alike.
    ``reset`` runs after each backward (inside the timing: an optimizer's zero_grad)."""
    def once(fn):
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
            if reset is not None:
                reset()
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


SWEEPS = {"E": [4, 16, 32, 64, 128], "T": [512, 2048, 8192], "k": [1, 2, 4, 8]}


def hf_experts(ex):
    """transformers' experts integration (the grouped_mm / fallback forward behind its MoE blocks) over the
    same weights as ``ex``, or None where transformers is not installed."""
    try:
        from transformers.integrations.moe import use_experts_implementation
    except ImportError:
        return None
    from types import SimpleNamespace

    @use_experts_implementation(has_gate=ex.glu, has_bias=ex.b1 is not None)
    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, self.act_fn = ex.num_experts, ex.act
            if ex.glu:  # [gate; up] in one (E, 2H, D) tensor, as Mixtral stores it
                self.gate_up_proj = torch.nn.Parameter(torch.cat([ex.wg.detach(), ex.w1.detach()], 1))
                if ex.b1 is not None:
                    self.gate_up_proj_bias = torch.nn.Parameter(torch.cat([ex.bg.detach(), ex.b1.detach()], 1))
            else:
                self.up_proj = torch.nn.Parameter(ex.w1.detach().clone())
                self.up_proj_bias = torch.nn.Parameter(ex.b1.detach().clone()) if ex.b1 is not None else None
            self.down_proj = torch.nn.Parameter(ex.w2.detach().clone())
            self.down_proj_bias = torch.nn.Parameter(ex.b2.detach().clone()) if ex.b2 is not None else None

    return Experts(SimpleNamespace(_experts_implementation="grouped_mm"))


def titan_experts(ex):
    """torchtitan's GroupedExperts over the same (SwiGLU, bias-free) weights, or None (not installed, or an FFN
    it cannot express)."""
    try:
        from torchtitan.models.common.moe import GroupedExperts
    except Exception:  # not installed, or its distributed dependencies missing
        return None
    if not ex.glu or ex.b1 is not None:
        return None
    H, D, _ = ex.dims
    m = GroupedExperts(GroupedExperts.Config(dim=D, hidden_dim=H, num_experts=ex.num_experts))
    with torch.no_grad():  # torchtitan: silu(x w1) * (x w3), ours: act(x wg) * (x w1)
        m.w1_EFD.copy_(ex.wg)
        m.w3_EFD.copy_(ex.w1)
        m.w2_EDF.copy_(ex.w2)
    return m


def titan_forward(m, x, expert, weight):
    """torchtitan's dispatch as its LocalTokenDispatcher does it: sort the slots by expert, run, scatter back."""
    T, k = expert.shape
    flat = expert.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=m.num_experts)
    y = m(x.index_select(0, order // k), counts)
    out = torch.zeros(T * k, y.shape[-1], dtype=y.dtype, device=y.device).index_copy(0, order, y)
    return (out.view(T, k, -1) * weight.unsqueeze(-1).to(y.dtype)).sum(1)


def sweep_one(D, H, ffn, E, k, T, device, dtype, repeats):
    """Seconds of forward+backward per path (dispatch + experts, fixed balanced routing) and of the ideal."""
    torch.manual_seed(0)
    make = (lambda: Mlp(D, H)) if ffn == "mlp" else (lambda: SwiGLU(D, H, bias=False))
    moe = from_dense(make(), E, k).to(device)
    ex = moe.experts
    dense = make().to(device)
    expert, weight = routing("balanced", T, E, k, device)
    x = torch.randn(T, D, device=device, requires_grad=True)
    xk = torch.randn(k * T, D, device=device, requires_grad=True)
    enabled = dtype != torch.float32
    empty = torch.empty(0, device=device)
    routed = Routing(expert, weight, empty, empty)
    with torch.autocast(device.type, dtype=dtype, enabled=enabled):
        auto = moe.dispatcher(x).name
    fns = {"ideal": lambda: dense(xk)}
    for name, d in DISPATCHERS.items():
        if d.supports(x) and not (name == "triton" and device.type == "cpu"):  # the interpreter is no timing
            fns[name] = lambda d=d: d(x, routed, ex)[0]
    hf, titan = hf_experts(ex), titan_experts(ex)
    if hf is not None:
        hf.to(device)
        fns["transformers"] = lambda: hf(x, expert, weight)
    if titan is not None:
        titan.to(device)
        fns["torchtitan"] = lambda: titan_forward(titan, x, expert, weight)
    if E <= 32:  # the naive loop takes minutes beyond
        fns["naive"] = lambda: naive(x, expert, weight, ex)
    params = [x, xk, *dense.parameters(), *ex.parameters(), *(hf.parameters() if hf is not None else ()),
              *(titan.parameters() if titan is not None else ())]

    def reset():
        for p in params:
            p.grad = None

    def amp(fn):
        def call():
            with torch.autocast(device.type, dtype=dtype, enabled=enabled):
                return fn()
        return call

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {}
    for n, f in fns.items():  # a peer that cannot run this dtype / device is left out, saying why
        try:
            amp(f)().float().sum().backward()
            runs[n] = amp(f)
        except Exception as e:  # noqa: BLE001
            print(f"  {n} left out: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
        reset()
    return auto, timed_interleaved(runs, True, repeats, sync, reset)


def append_table(args, argv, title: str, lines: list[str]) -> None:
    """With ``--out``: append ``### title``, the command line that made the table, and its ``lines``."""
    if not args.out:
        return
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    with open(args.out, "a") as f:
        f.write(f"\n### {title}\n\nCommand: `{cmd}`\n\n" + "\n".join(lines) + "\n")


def sweep_mode(args, argv, device, dtype, name) -> None:
    D, H, ffn = SHAPES[args.shapes[0]]
    H = args.hidden or H
    axis = args.sweep
    base = {"E": 64 if axis == "k" else 8, "k": 2, "T": args.tokens}  # the fixed point of each sweep
    if args.experts_given:
        base["E"] = args.experts[0]
    if args.k_given:
        base["k"] = args.k[0]
    values = args.values or SWEEPS[axis]
    cols = ["auto", "loop", "grouped", "triton", "transformers", "torchtitan", "naive"]
    rows, seen = [], set()
    for v in values:
        point = {**base, axis: v}
        auto, t = sweep_one(D, H, ffn, point["E"], point["k"], point["T"], device, dtype, args.repeats)
        ratio = {n: t[n] / t["ideal"] for n in t if n != "ideal"}
        ratio["auto"] = ratio[auto]
        seen.update(ratio)
        rows.append((point, auto, t["ideal"], ratio))
        print(f"{axis}={v}: ideal {t['ideal'] * 1e3:.1f} ms, auto={auto}, "
              + ", ".join(f"{n} {r:.2f}" for n, r in ratio.items()), flush=True)
    cols = [c for c in cols if c in seen]
    header = "| E | k | T | ideal ms | " + " | ".join(c if c != "auto" else "auto (path)" for c in cols) + " |"
    lines = [header, "|" + "---|" * (4 + len(cols))]
    for point, auto, ideal, ratio in rows:
        cells = [f"{ratio[c]:.2f}" + (f" ({auto})" if c == "auto" else "") if c in ratio else "-" for c in cols]
        lines.append(f"| {point['E']} | {point['k']} | {point['T']} | {ideal * 1e3:.1f} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    alloc = ", glibc default allocator" if args.glibc_default else ""
    append_table(args, argv, f"Sweep over {axis}: {name}, {args.dtype}, {ffn} D {D} H {H}, fwd+bwd / ideal, torch "
                 f"{torch.__version__}{alloc}", lines)


def host_memory_child(mode: str, E: int, steps: int) -> dict:
    """Training steps of one ViT-S-sized layer of E experts (forward, backward, SGD step, zero_grad to None) in
    this process: median step seconds and peak resident bytes."""
    import resource

    if mode == "reuse":
        reuse_freed_memory()
    torch.manual_seed(0)
    moe = from_dense(Mlp(384, 1536), E, 2)
    opt = torch.optim.SGD(moe.experts.parameters(), lr=1e-3)
    expert, weight = routing("balanced", 2048, E, 2, torch.device("cpu"))
    empty = torch.empty(0)
    routed = Routing(expert, weight, empty, empty)
    x = torch.randn(2048, 384, requires_grad=True)
    dispatcher = moe.dispatcher(x)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        y = dispatcher(x, routed, moe.experts)[0]
        y.backward(torch.ones_like(y))
        opt.step()
        opt.zero_grad(set_to_none=True)
        x.grad = None
        times.append(time.perf_counter() - t0)
    return {"step": statistics.median(times[steps // 2:]),
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def host_memory_mode(args, argv, name) -> None:
    """glibc's default allocator against reuse_freed_memory, each in a fresh process."""
    import json
    import subprocess

    E = args.experts[0] if args.experts_given else 128
    header = "| E | allocator | step ms (median, 2nd half) | peak RSS |"
    lines = [header, "|---|---|---|---|"]
    res = {}
    for mode in ("default", "reuse"):
        out = subprocess.run([sys.executable, __file__, "--host-memory-child", mode, "--experts", str(E),
                              "--steps", str(args.steps)], capture_output=True, text=True, check=True).stdout
        res[mode] = json.loads(out.strip().splitlines()[-1])
        label = "glibc default" if mode == "default" else "reuse_freed_memory (training commands on CPU)"
        lines.append(f"| {E} | {label} | {res[mode]['step'] * 1e3:.0f} | {res[mode]['peak'] / 2**30:.2f} GiB |")
    lines.append(f"\nreuse / default: step time {res['reuse']['step'] / res['default']['step']:.2f}x, peak RSS "
                 f"{res['reuse']['peak'] / res['default']['peak']:.2f}x")
    print("\n".join(lines))
    append_table(args, argv, f"Host memory reuse: {name}, fp32, ViT-S FFN, k 2, 2,048 tokens, {args.steps} steps, "
                 f"torch {torch.__version__}", lines)


def gemm_floor_mode(args, argv, name) -> None:
    """Where the time of many experts goes: the three GEMMs of one expert linear map (y = x W^T, dx = dy W,
    dW = dy^T x) for k*T rows split evenly over E experts, timed as one dense GEMM on all rows (the ideal's),
    per expert against one shared weight (small GEMMs, weights in cache), per expert against E weights (what
    segment_linear runs: each expert's weights streamed from memory), as one ``F.grouped_mm`` per GEMM (its CPU
    kernel loops over the groups in C++; outputs allocated per call, as an op's are), and one bmm over the
    equal groups; with the bytes of E weights (read twice, gradient written once) at this machine's copy
    bandwidth."""
    D, H, _ = SHAPES[args.shapes[0]]
    R = args.tokens * 2
    big = torch.empty(2**27)  # 512 MiB
    dst = torch.empty_like(big)
    dst.copy_(big)
    t0 = time.perf_counter()
    dst.copy_(big)
    bandwidth = 2 * big.numel() * 4 / (time.perf_counter() - t0)  # bytes read + written per second
    del big, dst
    header = ("| E | rows / expert | dense GEMMs ms | per expert, one weight | per expert, E weights | "
              "F.grouped_mm, E weights | bmm, E weights | E weights MB | traffic ms at copy bandwidth |")
    lines = [header, "|" + "---|" * 9]
    for E in args.values or SWEEPS["E"]:
        C = R // E
        x, g = torch.randn(E, C, D), torch.randn(E, C, H)
        w, out, dx, dw = torch.randn(E, H, D), torch.empty(E, C, H), torch.empty(E, C, D), torch.empty(E, H, D)
        xs, gs, ws = x.view(E * C, D), g.view(E * C, H), w[0]

        def dense(xs=xs, gs=gs, ws=ws, out=out, dx=dx, dw=dw, E=E, C=C):
            torch.mm(xs, ws.T, out=out.view(E * C, H))
            torch.mm(gs, ws, out=dx.view(E * C, D))
            torch.mm(gs.T, xs, out=dw[0])

        def per_expert(shared, x=x, g=g, w=w, out=out, dx=dx, dw=dw, E=E):
            for e in range(E):
                we = w[0] if shared else w[e]
                torch.mm(x[e], we.T, out=out[e])
                torch.mm(g[e], we, out=dx[e])
                torch.mm(g[e].T, x[e], out=dw[e])

        offs = torch.arange(1, E + 1, dtype=torch.int32) * C

        def grouped_mm(xs=xs, gs=gs, w=w, offs=offs):
            F.grouped_mm(xs, w.transpose(1, 2), offs=offs)
            F.grouped_mm(gs, w, offs=offs)
            F.grouped_mm(gs.T, xs, offs=offs)

        def bmm(x=x, g=g, w=w, out=out, dx=dx, dw=dw):
            torch.bmm(x, w.transpose(1, 2), out=out)
            torch.bmm(g, w, out=dx)
            torch.bmm(g.transpose(1, 2), x, out=dw)

        fns = {"dense": dense, "one": lambda f=per_expert: f(True), "many": lambda f=per_expert: f(False),
               "grouped_mm": grouped_mm, "bmm": bmm}
        t = timed_interleaved(fns, False, args.repeats, lambda: None)
        weight_bytes = E * H * D * 4
        traffic = 3 * weight_bytes / bandwidth  # the weights read twice and their gradient written once
        ratios = " | ".join(f"{t[n] / t['dense']:.2f}x" for n in ("one", "many", "grouped_mm", "bmm"))
        lines.append(f"| {E} | {C} | {t['dense'] * 1e3:.1f} | {ratios} | {weight_bytes / 1e6:.0f} | "
                     f"{traffic * 1e3:.1f} |")
        print(lines[-1], flush=True)
    lines.append(f"\nCopy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write of 512 MiB)")
    print(lines[-1])
    append_table(args, argv, f"GEMM floor of many experts: {name}, fp32, one linear map D {D} -> H {H}, {R} rows, "
                 f"torch {torch.__version__}", lines)


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
    ap.add_argument("--sweep", choices=list(SWEEPS), help="ratio-to-ideal table over E, T or k, with the peers")
    ap.add_argument("--values", nargs="+", type=int, help="--sweep: the values (default: E 4..128, T 512..8192, "
                                                              "k 1..8)")
    ap.add_argument("--hidden", type=int, help="--sweep: hidden features per expert (default: the shape's)")
    ap.add_argument("--host-memory", action="store_true", help="training steps of an E 128 layer (--experts) with "
                    "glibc's default allocator and with reuse_freed_memory: step time and peak RSS")
    ap.add_argument("--gemm-floor", action="store_true", help="the GEMMs of one expert linear map over E experts "
                    "(--values) against the dense GEMM on the same rows: small-GEMM rate and weight traffic")
    ap.add_argument("--host-memory-child", choices=["default", "reuse"], help=argparse.SUPPRESS)
    ap.add_argument("--glibc-default", action="store_true", help="keep glibc's default of unmapping freed large "
                    "blocks (the training commands turn it off: moe_cli.runtime.reuse_freed_memory)")
    args = ap.parse_args(argv)
    raw = argv if argv is not None else sys.argv[1:]
    args.experts_given, args.k_given = "--experts" in raw, "--k" in raw
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    if args.model:
        return model_mode(args, argv, device, dtype, name)
    if args.host_memory_child:
        import json

        return print(json.dumps(host_memory_child(args.host_memory_child, args.experts[0], args.steps)))
    if args.host_memory:
        return host_memory_mode(args, argv, name)
    if not args.glibc_default:
        reuse_freed_memory()  # as `moe finetune` does
    if args.gemm_floor:
        return gemm_floor_mode(args, argv, name)
    if args.sweep:
        return sweep_mode(args, argv, device, dtype, name)
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
    append_table(args, argv, f"{name}, {args.dtype}, T={args.tokens} tokens, torch {torch.__version__}", lines)


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
    append_table(args, argv, f"Training step, {name}, {args.dtype}, torch {torch.__version__}", lines)


if __name__ == "__main__":
    main()
