"""Where tokens go: expert load per layer, routing per class, per-patch expert maps; figures via matplotlib (Agg)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moe_cli.errors import MoeError
from moe_cli.moe.layer import moe_layers
from moe_cli.moe.recorder import RoutingRecorder, load_share
from moe_cli.runtime import atomic_write

NO_MOE = "this checkpoint has no MoE layers: there is no routing to inspect"


@torch.no_grad()
def collect_routes(model: nn.Module, loader, device: torch.device, num_classes: int, n_images: int = 4) -> dict:
    """Per layer: load (share of routed pairs per expert) and per-class load; patch maps of up to ``n_images``
    images, one per class (the first of each class met), with their class and the model's prediction."""
    layers = moe_layers(model)
    if not layers:
        raise MoeError(NO_MOE)
    per_class = {n: torch.zeros(num_classes, m.num_experts) for n, m in layers}  # pruned layers differ in E
    maps: dict[str, list] = {n: [] for n, _ in layers}
    images: list[torch.Tensor] = []
    labels: list[int] = []
    preds: list[int] = []
    model.eval()
    with RoutingRecorder(model, gates=True) as rec:
        for x, y in loader:
            logits = model(x.to(device))
            take = pick_images(y.tolist(), labels, n_images)  # batch rows still wanted for the patch maps
            for name, _ in layers:
                gate = rec.records[name].gate
                used = (gate > 0).float().cpu()  # (B, N, E)
                per_class[name].index_add_(0, y, used.sum(1))
                maps[name].extend(gate.argmax(-1).cpu()[take])
            labels.extend(y[take].tolist())
            preds.extend(logits[take].argmax(-1).cpu().tolist() if logits.dim() == 2 else [-1] * len(take))
            images.extend(x[take])
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    prefix = getattr(model, "num_prefix_tokens", 0)
    classes = getattr(loader.dataset, "classes", None)
    out = {"experts": max(m.num_experts for _, m in layers), "layers": {}, "patch_grid": list(grid) if grid else None,
           "class_names": [str(c) for c in classes] if classes else [str(c) for c in range(num_classes)],
           "image_labels": labels, "image_predictions": preds}
    for name, _ in layers:
        counts = per_class[name]
        out["layers"][name] = {
            "load": load_share(counts.sum(0)).tolist(),
            "per_class": load_share(counts).tolist(),
            "patch_experts": [m[prefix:].reshape(*grid).tolist() if grid else m.tolist() for m in maps[name]],
        }
    out["_images"] = images
    return out


def pick_images(batch_labels: list[int], have: list[int], n: int) -> list[int]:
    """Rows of a batch to add to the ``have`` images already picked: the first of each class not yet shown, up
    to ``n`` in all."""
    rows, seen = [], set(have)
    for i, label in enumerate(batch_labels):
        if len(have) + len(rows) >= n:
            break
        if label not in seen:
            rows.append(i)
            seen.add(label)
    return rows


def caption(fig, text: str):
    """The figure's note, centred under the lowest x-axis label (anchored to it, so they never overlap)."""
    labelled = [a for a in fig.axes if a.get_xlabel()]
    below = labelled[-1].xaxis.label if labelled else fig.axes[-1]
    return fig.axes[0].annotate(text, xy=(0.5, 0), xycoords=("figure fraction", below), xytext=(0, -8),
                                textcoords="offset points", ha="center", va="top", fontsize=8,
                                annotation_clip=False)


def write_figures(routes: dict, out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoeError("moe inspect draws with matplotlib: pip install -e '.[plots]' in the moe-cli checkout") \
            from None
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(routes["layers"])
    written = []

    def save(fig, filename):
        path = out_dir / filename
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
        plt.close(fig)
        written.append(path)

    E = routes["experts"]


    load = np.full((len(names), E), np.nan)  # pruned layers have fewer experts: their missing cells stay blank
    for i, n in enumerate(names):
        load[i, :len(routes["layers"][n]["load"])] = routes["layers"][n]["load"]
    fig, ax = plt.subplots(figsize=(2 + 0.6 * load.shape[1], 1.5 + 0.4 * len(names)))
    im = ax.imshow(load, cmap="viridis", vmin=0, aspect="auto")
    ax.set(xlabel="expert", ylabel="MoE layer", xticks=range(E), yticks=range(len(names)), yticklabels=names,
           title="expert load per layer")
    fig.colorbar(im, ax=ax, label="share of routed (token, slot) pairs")
    caption(fig, "Each row sums to 1; a balanced layer has every cell near 1/E.")
    save(fig, "expert_load.png")

    classes = routes["class_names"]
    per_class = [np.array(routes["layers"][n]["per_class"]) for n in names]
    top = max(float(np.nanmax(p)) for p in per_class) or 1.0
    fig, axes = plt.subplots(1, len(names), figsize=(1.2 + (1.1 + 0.3 * E) * len(names), 1.6 + 0.28 * len(classes)),
                             squeeze=False, sharey=True, layout="constrained")
    im = None
    for j, (ax, n, p) in enumerate(zip(axes[0], names, per_class, strict=True)):
        im = ax.imshow(p, cmap="magma", vmin=0, vmax=top, aspect="auto")
        ax.set_title(n, fontsize=8)
        ax.set_xticks(range(p.shape[1]))
        ax.set_xlabel("expert", fontsize=8)
        if j == 0:  # the axes share y: the first one's labels are every panel's
            ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("class")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of the class's tokens", shrink=0.9)
    fig.suptitle("Which experts each class uses", fontsize=10)
    caption(fig, "One row per class: how that class's image tokens split over the experts of each MoE layer "
                 "(each row adds up to 1). Bright cells: the experts the class relies on.")
    save(fig, "class_routing.png")

    if routes["patch_grid"] and routes["_images"]:
        from matplotlib.patches import Patch

        imgs = routes["_images"]
        cmap = plt.get_cmap("tab10" if E <= 10 else "tab20", E)
        fig, axes = plt.subplots(len(imgs), 1 + len(names), figsize=(1.5 * (1 + len(names)), 1.5 * len(imgs) + 0.9),
                                 squeeze=False, layout="constrained")
        for i, img in enumerate(imgs):
            axes[i][0].imshow(((img[:3].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            label, pred = routes["image_labels"][i], routes["image_predictions"][i]
            title = f"class {classes[label]}" + (f", predicted {classes[pred]}" if 0 <= pred < len(classes) else "")
            axes[i][0].set_title(title, fontsize=7, color="black" if pred in (label, -1) else "red")
            for j, n in enumerate(names):
                axes[i][j + 1].imshow(np.array(routes["layers"][n]["patch_experts"][i]), cmap=cmap,
                                      vmin=-0.5, vmax=E - 0.5)
                if i == 0:
                    axes[i][j + 1].set_title(n, fontsize=7)
            for ax in axes[i]:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.legend(handles=[Patch(color=cmap(e), label=f"expert {e}") for e in range(E)], loc="outside upper center",
                   ncol=min(E, 8), fontsize=7)
        caption(fig, "Each patch is coloured by the expert that weighs most for that patch, per MoE layer "
                     "(columns); left: the image, its class and the model's prediction (red when wrong).")
        save(fig, "patch_experts.png")
    return written


def write_routes_json(routes: dict, path: Path) -> None:
    data = {k: v for k, v in routes.items() if not k.startswith("_")}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))


def training_load(metrics: Path) -> dict[str, tuple[list[int], list[list[float]]]]:
    """{layer: (steps, load per expert at each)} from a run's metrics.jsonl (the loop's routing-health records);
    empty when the run has none."""
    out: dict[str, tuple[list[int], list[list[float]]]] = {}
    if not metrics.is_file():
        return out
    for line in metrics.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        for name, r in (rec.get("routing") or {}).items() if rec.get("split") == "train" else ():
            steps, loads = out.setdefault(name, ([], []))
            steps.append(rec["step"])
            loads.append(r["load"])
    return out


def write_training_load(load: dict, path: Path) -> Path:
    """One panel per MoE layer: each expert's share of the load over the training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(load)
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names) + 0.6), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        steps, loads = load[name]
        experts = max(len(v) for v in loads)
        for e in range(experts):
            ax.plot(steps, [v[e] if e < len(v) else np.nan for v in loads], label=str(e))
        ax.axhline(1 / experts, color="grey", lw=0.8, ls="--")
        ax.set(title=name, ylabel="share of load", ylim=(0, 1.05))
    axes[-1, 0].set_xlabel("training step")
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, title="expert", title_fontsize=7)
    fig.text(0.5, -0.01, "Each expert's share of the routed tokens over training (dashed: an even share).",
             ha="center", va="top", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return path
