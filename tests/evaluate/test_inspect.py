"""`moe inspect` writes non-empty PNGs whose pixels differ between checkpoints that route differently."""

import json

import numpy as np
from conftest import TINY, tiny_model
from matplotlib.image import imread

from moe_cli.io.checkpoint import Checkpoint, save
from moe_cli.models.surgery import upcycle

NAME, KWARGS = TINY["vit"]


def test_inspect_figures_differ_with_routing(tmp_path, cli):
    pixels = []
    for seed in (0, 1):  # same experts, routers drawn from different seeds
        model, cfg = upcycle(tiny_model("vit"), experts=4, k=1, normalize=False, seed=seed)
        save(Checkpoint(model, {"name": NAME, "kwargs": KWARGS}), tmp_path / f"ck{seed}")
        out = tmp_path / f"insp{seed}"
        r = cli("inspect", str(tmp_path / f"ck{seed}"), "--data", "digits", "--out", str(out), "--images", "2")
        assert r.exit_code == 0, r.output
        for name in ("expert_load.png", "class_routing.png", "patch_experts.png"):
            image = imread(out / name)  # a real PNG, of a readable size, with something drawn on it
            assert image.ndim == 3 and min(image.shape[:2]) >= 200 and image[..., :3].std() > 0.05, name
        routes = json.loads((out / "routes.json").read_text())
        assert set(routes["layers"]) == {"blocks.0.mlp", "blocks.1.mlp"}
        assert abs(sum(routes["layers"]["blocks.0.mlp"]["load"]) - 1) < 1e-6
        assert len(routes["layers"]["blocks.0.mlp"]["patch_experts"]) == 2
        # the images of patch_experts.png come with their class and the model's prediction, named by class
        assert routes["class_names"] == [str(c) for c in range(10)]
        assert len(routes["image_labels"]) == len(routes["image_predictions"]) == 2
        assert all(0 <= c < 10 for c in routes["image_labels"] + routes["image_predictions"])
        pixels.append({n: imread(out / n) for n in ("expert_load.png", "class_routing.png", "patch_experts.png")})
    for name in pixels[0]:
        a, b = pixels[0][name], pixels[1][name]
        assert a.shape != b.shape or not np.array_equal(a, b), f"{name} did not change with the routing"


def test_inspect_dense_checkpoint_is_an_error(tmp_path, cli):
    save(Checkpoint(tiny_model("vit"), {"name": NAME, "kwargs": KWARGS}), tmp_path / "dense")
    r = cli("inspect", str(tmp_path / "dense"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "no MoE layers" in r.stderr


def test_a_figure_caption_sits_below_the_axis_label():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_cli.evaluate.inspect import caption

    for rows in (1, 2, 12):  # small and tall figures (the caption used to sit at a fixed figure fraction)
        fig, ax = plt.subplots(figsize=(4.4, 1.5 + 0.4 * rows))  # as expert_load.png: 4 experts, `rows` layers
        im = ax.imshow([[0.5] * 4] * rows, aspect="auto")
        ax.set(xlabel="expert", ylabel="MoE layer", yticks=range(rows), yticklabels=[f"blocks.{i}.mlp" for i in
                                                                                      range(rows)], title="load")
        fig.colorbar(im, ax=ax, label="share of routed (token, slot) pairs")
        note = caption(fig, "Each row sums to 1; a balanced layer has every cell near 1/E.")
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        label, text = ax.xaxis.label.get_window_extent(renderer), note.get_window_extent(renderer)
        assert text.y1 <= label.y0, rows  # entirely below the label: no overlap
        plt.close(fig)
