"""Recipe validation messages, --set overrides, and their CLI exit codes."""

import pytest
import torch
from conftest import write_recipe

from moe_cli.errors import ConfigError
from moe_cli.recipe import load_recipe


def test_unknown_key_suggests(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lrr: 0.1\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(f)
    assert str(e.value) == "unknown key `optim.lrr` in run.yaml — did you mean `optim.lr`?"


def test_wrong_type_names_field_and_type(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  steps: 3\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"`train.batch_size` in run.yaml must be integer, got str 'lots'"):
        load_recipe(f)
    f.write_text("train:\n  steps: 3\n  precision: fp8\n")
    with pytest.raises(ConfigError, match=r"`train.precision` in run.yaml must be 'fp32' \| 'bf16' \| 'fp16'"):
        load_recipe(f)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(f)


def test_set_overrides(tmp_path):
    f = write_recipe(tmp_path / "run.yaml", tmp_path / "out")
    r = load_recipe(f, ["optim.lr=3e-4", "model.upcycle.experts=8", "model.upcycle.k=1", "train.steps=5"])
    assert r.optim.lr == 3e-4 and r.model.upcycle.experts == 8 and r.model.upcycle.k == 1 and r.train.steps == 5
    with pytest.raises(ConfigError, match="did you mean `train.steps`"):
        load_recipe(f, ["train.step=5"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_recipe(f, ["optim.lr"])


def test_cli_exit_code_and_one_line(cli, tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lrr: 0.1\ntrain:\n  steps: 3\n")
    r = cli("finetune", str(f))
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: unknown key `optim.lrr` in run.yaml — did you mean `optim.lr`?"
    r = cli("finetune", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 2 and "recipe not found" in r.stderr


def test_then_chain_runs_resumes_and_refuses_to_overwrite(tmp_path, cli):
    from conftest import write_recipe

    from moe_cli.io.checkpoint import load_checkpoint
    from moe_cli.recipe import load_recipe, recipe_chain
    from moe_cli.train.build import build_model

    path = write_recipe(tmp_path / "r.yaml", tmp_path / "a", train={"steps": 3},
                        then={"train": {"steps": 2}, "model": {"upcycle": {"experts": 2, "k": 1}},
                              "output": str(tmp_path / "b")})
    r = cli("finetune", path)
    assert r.exit_code == 0, r.output
    assert "1/2 classify final: step 3" in r.output and "2/2 classify final: step 2" in r.output
    assert load_checkpoint(tmp_path / "b" / "final").moe.experts == 2
    first = load_checkpoint(tmp_path / "a" / "final").model.state_dict()
    start = build_model(recipe_chain(load_recipe(path))[1]).model.state_dict()  # starts from the first run
    assert torch.equal(start["patch_embed.proj.weight"], first["patch_embed.proj.weight"])
    r = cli("finetune", path)
    assert r.exit_code == 2 and "--resume" in r.stderr
    r = cli("finetune", path, "--resume")
    assert r.exit_code == 0 and "is complete, skipping" in r.output and "2/2 classify final: step 2" in r.output


TINY_VIT = "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2, num_classes: 10}"


@pytest.mark.parametrize("recipe,overrides", [
    ("recipes/cifar100-vit-densify-to-sparse.yaml",
     ["densify.stage1.steps=2", "densify.stage2.steps=2", "densify.stage3.steps=2", "train.eval_every=0"]),
    ("recipes/imagenet-vit-b-upcycle.yaml",
     ["model.source=vit_tiny_patch16_224", "model.pretrained=false", "train.steps=2", "train.compile=false",
      "train.eval_every=0", "train.ckpt_every=0", "train.batch_size=16"]),
])
def test_paper_recipes_run_two_steps_on_a_tiny_stand_in(cli, tmp_path, recipe, overrides):
    """The recipes as shipped, with the model, data and length swapped for a tiny stand-in through --set."""
    from pathlib import Path

    root = Path(__file__).parents[1]
    command = "densify-to-sparse" if "densify" in recipe else "finetune"
    stand_in = [TINY_VIT, "data.name=digits", "data.root=null", "data.download=false", "data.num_workers=0",
                "train.precision=fp32", f"output={tmp_path / 'run'}", *overrides]
    r = cli(command, str(root / recipe), *[a for s in stand_in for a in ("--set", s)])
    assert r.exit_code == 0, r.output
    assert any((tmp_path / "run").rglob("final/model.safetensors"))


def test_readme_figures_read_what_the_command_prints(cli, tmp_path):
    """bench/readme_figures.py builds the README tables from summary.json: the same numbers `moe finetune` prints
    at the end of the run (a stale README figure can only come from not rerunning the script)."""
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("readme_figures", Path(__file__).parents[1] / "bench" /
                                                  "readme_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "run", train={"steps": 3, "batch_size": 16})
    r = cli("finetune", f)
    assert r.exit_code == 0, r.output
    printed = dict(re.findall(r"(accuracy|ce) ([0-9.]+)", r.output.split("final:")[-1]))
    s = figures.summary(str(tmp_path / "run"))
    assert f"{s['accuracy']:.4f}" == printed["accuracy"] and f"{s['ce']:.4f}" == printed["ce"]
    assert figures.pct(s["accuracy"]) == f"{100 * float(printed['accuracy']):.2f}%"
