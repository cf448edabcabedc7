"""A checkpoint remembers the data it was trained on: `moe eval` and `moe inspect` read it by default and say
which it is, `--data` accepts what recipes accept, and a checkpoint without the record (or whose folder is gone)
is one line asking for `--data` — never another data set. Figures name the classes and show one image per
class."""

import json
import shutil

import numpy as np
from conftest import one_line, write_recipe
from PIL import Image

from moe_cli.data.loaders import data_from_spec
from moe_cli.io.checkpoint import load_checkpoint

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_folder(root, per_class=12):
    """``root/<name>/i.png``: the first ``per_class`` digits of each class as 32x32 RGB images, class-sorted."""
    from moe_cli.data.digits import load_raw

    images, labels = load_raw()
    for c, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        for i, idx in enumerate((labels == c).nonzero().flatten()[:per_class].tolist()):
            pixels = (images[idx].numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(root / name / f"{i}.png")
    return root


def test_eval_and_inspect_read_the_training_data_by_default(tmp_path, cli):
    folder = digit_folder(tmp_path / "imgs")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", data={"name": "", "root": str(folder)},
                          model={"upcycle": {"experts": 4, "k": 2}}, train={"steps": 6})
    assert cli("finetune", recipe).exit_code == 0
    final = tmp_path / "run" / "final"
    record = load_checkpoint(final).extra["data"]
    assert record["root"] == str(folder.resolve()) and record["classes"] == sorted(NAMES)
    r = cli("eval", str(final), "--metric", "accuracy,ce")
    assert r.exit_code == 0 and f"data: {folder.resolve()}\n" in r.output and "moe eval (imgs)" in r.output, r.output
    default = json.loads(cli("eval", str(final), "--metric", "accuracy,ce", "--json").stdout)
    given = json.loads(cli("eval", str(final), "--data", str(folder), "--metric", "accuracy,ce", "--json").stdout)
    digits = json.loads(cli("eval", str(final), "--data", "digits", "--metric", "accuracy,ce", "--json").stdout)
    assert default["ce"] == given["ce"] and default["data"] == str(folder.resolve())
    assert digits["ce"] != default["ce"] and digits["data"] == "digits"  # another data set only when asked
    assert cli("inspect", str(final), "--out", str(tmp_path / "insp"), "--images", "4").exit_code == 0
    routes = json.loads((tmp_path / "insp" / "routes.json").read_text())
    assert routes["class_names"] == sorted(NAMES)  # the folders' names, not 0-9
    assert len(set(routes["image_labels"])) == 4  # four classes, not four images of the first class
    # the folder is gone: one line asking for --data, not digits
    shutil.move(folder, tmp_path / "moved")
    one_line(cli("eval", str(final)), "which is not here; pass --data FOLDER")
    one_line(cli("inspect", str(final), "--out", str(tmp_path / "i2")), "which is not here; pass --data FOLDER")
    one_line(cli("prune", str(final), "--keep", "2", "-o", str(tmp_path / "p")), "pass --calib FOLDER")


def test_a_checkpoint_without_a_data_record_asks_for_data(tmp_path, cli):
    assert cli("upcycle", "vit_tiny_patch16_224", "--no-pretrained", "-m", "depth=2", "-m", "img_size=32", "-m",
               "num_classes=10", "--out", str(tmp_path / "m")).exit_code == 0
    one_line(cli("eval", str(tmp_path / "m")), "does not record the data it was trained on")
    assert cli("eval", str(tmp_path / "m"), "--data", "digits", "--metric", "ce").exit_code == 0


def test_data_accepts_what_recipes_accept():
    from torch import nn

    assert data_from_spec("hfds/beans", nn.Linear(1, 1)).name == "hfds/beans"
    cfg = data_from_spec("hfds/imagefolder:/data/pets", nn.Linear(1, 1))
    assert (cfg.name, cfg.data_dir) == ("hfds/imagefolder", "/data/pets")
    assert data_from_spec("torch/cifar10", nn.Linear(1, 1)).name == "torch/cifar10"


def test_eval_of_a_plain_dense_model_the_baseline(tmp_path, cli):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=10)
    (tmp_path / "dense").mkdir()
    save_file(model.state_dict(), str(tmp_path / "dense" / "model.safetensors"))
    (tmp_path / "dense" / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "model_args": {"depth": 2, "img_size": 32, "num_classes": 10}}))
    r = cli("eval", str(tmp_path / "dense"), "--data", "digits", "--metric", "accuracy,ce,flops", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["checkpoint"]["moe"] is None and 0 <= out["accuracy"]["top1"] <= 1
    one_line(cli("eval", str(tmp_path / "dense")), "does not record the data it was trained on")
