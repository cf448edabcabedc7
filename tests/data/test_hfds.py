"""Hugging Face `datasets` through `data.name: hfds/...`: a packaged builder (imagefolder, parquet, ...) reads the
folder the recipe names (`data.data_dir`) or the files of each split (`data.data_files`), never whatever sits
under the current directory; a missing split is one line naming the splits there are and the key to set."""

import json

import numpy as np
import pytest
from conftest import one_line, write_recipe
from PIL import Image

pytest.importorskip("datasets")

from moe_cli.io.checkpoint import load_checkpoint  # noqa: E402


def image_splits(root, splits=("train", "test"), classes=("cat", "dog"), per_class=4):
    """``root/<split>/<class>/i.png``: the layout the datasets library's imagefolder builder reads."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_reads_the_named_folder_and_eval_finds_it_again(tmp_path, cli, monkeypatch):
    data = image_splits(tmp_path / "pets")
    image_splits(tmp_path / "elsewhere" / "decoy", classes=("a", "b", "c"))  # what the cwd holds
    monkeypatch.chdir(tmp_path / "elsewhere")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", train={"steps": 2, "batch_size": 4},
                          data={"name": "hfds/imagefolder", "data_dir": str(data), "val_split": "test"})
    r = cli("finetune", recipe)
    assert r.exit_code == 0, r.output
    record = load_checkpoint(tmp_path / "run" / "final").extra["data"]
    assert record["classes"] == ["cat", "dog"] and record["data_dir"] == str(data.resolve())
    r = cli("eval", str(tmp_path / "run" / "final"), "--metric", "ce", "--json")
    assert r.exit_code == 0, r.output
    default = json.loads(r.stdout)
    import shutil

    shutil.copytree(data / "test", tmp_path / "named" / "validation")  # --data reads the validation split
    given = json.loads(cli("eval", str(tmp_path / "run" / "final"), "--data", f"hfds/imagefolder:{tmp_path / 'named'}",
                           "--metric", "ce", "--json").stdout)
    assert default["ce"] == pytest.approx(given["ce"], rel=1e-6)


def test_data_files_name_each_splits_files_and_eval_reads_them_again(tmp_path, cli, monkeypatch):
    data = image_splits(tmp_path / "pets", splits=("a", "b"))  # folders named unlike any split
    image_splits(tmp_path / "cwd" / "decoy", classes=("x", "y", "z"))
    monkeypatch.chdir(tmp_path / "cwd")
    files = {"train": str(data / "a" / "**"), "validation": [str(data / "b" / "cat" / "*.png"),
                                                               str(data / "b" / "dog" / "*.png")]}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", train={"steps": 2, "batch_size": 4},
                          data={"name": "hfds/imagefolder", "data_files": files})
    r = cli("finetune", recipe)
    assert r.exit_code == 0, r.output
    record = load_checkpoint(tmp_path / "run" / "final").extra["data"]
    assert record["classes"] == ["cat", "dog"]
    assert record["data_files"] == {"train": [files["train"]], "validation": files["validation"]}
    r = cli("eval", str(tmp_path / "run" / "final"), "--metric", "ce", "--json")
    assert r.exit_code == 0, r.output
    import shutil

    shutil.copytree(data / "b", tmp_path / "named" / "validation")  # the same images, given as a folder
    given = json.loads(cli("eval", str(tmp_path / "run" / "final"), "--data", f"hfds/imagefolder:{tmp_path / 'named'}",
                           "--metric", "ce", "--json").stdout)
    assert json.loads(r.stdout)["ce"] == pytest.approx(given["ce"], rel=1e-6)


def test_hfds_traps_are_one_line(tmp_path, cli, monkeypatch):
    data = image_splits(tmp_path / "pets")
    image_splits(tmp_path / "cwd", splits=("train",))
    monkeypatch.chdir(tmp_path / "cwd")
    for data_cfg, needle in (
            ({"name": "hfds/imagefolder"}, "`data.name: hfds/imagefolder` reads the files it is pointed at: set "
                                           "`data.data_dir`"),
            ({"name": "hfds/parquet", "root": str(data)}, "`data.root` is the datasets cache"),
            ({"name": "hfds/imagefolder", "data_dir": str(data)},  # validation is not there: train and test are
             "`hfds/imagefolder` has no split `validation` (it has train, test); set `data.val_split`"),
            ({"name": "hfds/imagefolder", "data_dir": str(tmp_path / "nope")}, "is not a folder"),
            ({"name": "", "root": str(data), "data_dir": str(data)}, "`data.data_dir` in r.yaml must be set only "
                                                                     "with `data.name: hfds/<builder>`"),
            ({"name": "hfds/parquet", "data_files": {"train": str(tmp_path / "none-*.parquet")}},
             "`data.data_files.train` " + str(tmp_path / "none-*.parquet") + " matches no file"),
            ({"name": "hfds/parquet", "data_files": ["a.parquet"]}, "`data.data_files` in r.yaml must be mapping "
                                                                     "or null, got list"),
            ({"name": "hfds/parquet", "data_files": {"train": 3}}, "`data.data_files` in r.yaml must be a mapping "
                                                                    "of split names to a file (or glob)"),
            ({"name": "hfds/imagefolder", "data_dir": str(data), "data_files": {"train": "x"}},
             "`data.data_files` in r.yaml must be left out when `data.data_dir` is set")):
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", data=data_cfg, train={"steps": 1})
        one_line(cli("finetune", recipe), needle)
        assert not (tmp_path / "run" / "final").exists()
