"""Bad input over every command: one `error:` line on stderr, exit 2, nothing written — and the cases that used
to be silently wrong."""

import json
import os

import pytest
import safetensors.torch
import torch
from conftest import model_args, one_line, write_recipe

from moe_cli.io.checkpoint import Checkpoint, load_checkpoint, read_metadata, read_tensors, save
from moe_cli.models.surgery import upcycle
from moe_cli.train.run_folder import lock_output

M = ["vit_tiny_patch16_224", "--no-pretrained", *model_args("vit")]


@pytest.fixture
def moe_ckpt(tmp_path):
    import timm

    kw = {"depth": 2, "img_size": 32, "num_classes": 10}
    model, _ = upcycle(timm.create_model("vit_tiny_patch16_224", **kw), experts=4, k=2)
    return save(Checkpoint(model, {"name": "vit_tiny_patch16_224", "kwargs": kw}), tmp_path / "ck").parent


@pytest.mark.parametrize("args,needle", [
    (["--experts", "100000"], "needs about"),
    (["-m", "num_heads=5"], "cannot build"),
    (["--capacity-factor", "nan"], "--capacity-factor must be a finite number"),
    (["--capacity-factor", "inf"], "--capacity-factor must be a finite number"),
    (["--experts", "2", "--k", "0"], "--k must be between 1"),
    (["--noise-std", "-1"], "--noise-std"),
])
def test_upcycle_bad_options(cli, tmp_path, args, needle):
    one_line(cli("upcycle", *M, *args, "--out", str(tmp_path / "o")), needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("config,needle", [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object")])
def test_plain_weights_with_bad_config_json(cli, tmp_path, config, needle):
    import timm

    folder = tmp_path / "plain"
    folder.mkdir()
    safetensors.torch.save_file(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).state_dict(),
                                str(folder / "model.safetensors"))
    (folder / "config.json").write_text(config)
    one_line(cli("upcycle", str(folder), "--out", str(tmp_path / "o")), needle)


@pytest.mark.parametrize("override,needle", [
    ("train.log_every=0", "`train.log_every`"), ("train.label_smoothing=2", "`train.label_smoothing`"),
    ("optim.betas=[2,0.9]", "`optim.betas`"), ("optim.momentum=-1", "`optim.momentum`"),
    ("data.num_workers=-1", "`data.num_workers`"), ("optim.lr=.nan", "`optim.lr`"), ("train.clip=-1", "`train.clip`"),
    ("schedule.min_lr_ratio=-5", "`schedule.min_lr_ratio`"), ("optim.weight_decay=-1", "`optim.weight_decay`"),
    ("schedule.warmup_steps=-3", "`schedule.warmup_steps`"), ("data.img_size=0", "`data.img_size`"),
    ("train.eval_every=-1", "`train.eval_every`"), ("train.ckpt_every=-1", "`train.ckpt_every`"),
    ("data.img_size=48", "`data.img_size` 48 does not match"),
    ("model.upcycle={experts: 2, k: 3}", "`model.upcycle.k`"),
])
def test_finetune_bad_recipe_values(cli, tmp_path, override, needle):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out")
    one_line(cli("finetune", f, "--set", override), needle)
    assert not (tmp_path / "out" / "final").exists()


def test_binary_file_as_recipe(cli, tmp_path):
    (tmp_path / "r.yaml").write_bytes(bytes(range(256)))
    one_line(cli("finetune", str(tmp_path / "r.yaml")), "not a text file")


@pytest.mark.parametrize("override,needle", [("densify.stage2.lr=-1", "`densify.stage2.lr`"),
                                             ("densify.stage3.steps=0", "`densify.stage3.steps`")])
def test_densify_bad_stage_fails_before_stage_1(cli, tmp_path, override, needle):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", densify={"experts": 2, "k": 1})
    one_line(cli("densify-to-sparse", f, "--set", override), needle)
    assert not (tmp_path / "out").exists()


def test_densify_existing_output_does_not_suggest_resume(cli, tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", densify={
        "experts": 2, "k": 1, "stage1": {"steps": 1}, "stage2": {"steps": 1}, "stage3": {"steps": 1}})
    assert cli("densify-to-sparse", f).exit_code == 0
    r = cli("densify-to-sparse", f)
    one_line(r, "--overwrite")
    assert "--resume" not in r.stderr


def test_resume_refuses_changed_model_and_damaged_state(cli, tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", train={"steps": 2, "ckpt_every": 1})
    assert cli("finetune", f).exit_code == 0
    one_line(cli("finetune", f, "--resume", "--set", "model.kwargs.depth=3"), "`model.kwargs.depth` differs")
    one_line(cli("finetune", f, "--resume", "--set", "optim.name=sgd"), "`optim.name` differs")
    # sections nobody listed are protected by default (before, only a hand-kept list of sections was compared)
    one_line(cli("finetune", f, "--resume", "--set", "moe.load_balance=0.5"), "`moe.load_balance` differs")
    one_line(cli("finetune", f, "--resume", "--set", "genie.seed=3"), "`genie.seed` differs")
    one_line(cli("finetune", f, "--resume", "--set", "train.batch_size=8"),
             "the global batch (train.batch_size x processes) must stay 32 x 1")
    state = tmp_path / "out" / "last" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    one_line(cli("finetune", f, "--resume"), "cannot be read")
    state.write_bytes(b"garbage")
    one_line(cli("finetune", f, "--resume"), "cannot be read")


def test_second_run_on_a_locked_folder(cli, tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out")
    handle = lock_output(tmp_path / "out")
    try:
        one_line(cli("finetune", f), "in use by another run")
    finally:
        handle.close()


def test_overwrite_starts_clean_and_resume_does_not_repeat_steps(cli, tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", train={"steps": 4, "log_every": 1, "ckpt_every": 2})
    assert cli("finetune", f).exit_code == 0
    metrics = tmp_path / "out" / "metrics.jsonl"
    assert cli("finetune", f, "--overwrite").exit_code == 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4]  # the old run's records are gone
    with metrics.open("a") as fh:  # as if a killed run had logged past its last checkpoint
        fh.write(json.dumps({"step": 5, "split": "train", "loss": 9.0}) + "\n")
    assert cli("finetune", f, "--resume", "--set", "train.steps=6").exit_code == 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_export_casts_refuses_overwrite_and_rejects_pt(cli, tmp_path, moe_ckpt):
    bf16 = tmp_path / "m.bf16.safetensors"
    assert cli("export", str(moe_ckpt), "--out", str(bf16), "--dtype", "bf16").exit_code == 0
    fp32 = tmp_path / "m.fp32.safetensors"
    assert cli("export", str(bf16), "--out", str(fp32), "--dtype", "fp32").exit_code == 0
    assert all(t.dtype == torch.float32 for t in read_tensors(fp32).values() if t.is_floating_point())
    assert read_metadata(fp32)["dtype"] == "fp32"
    one_line(cli("export", str(moe_ckpt), "--out", str(fp32)), "exists; pass --overwrite")
    assert cli("export", str(moe_ckpt), "--out", str(fp32), "--overwrite").exit_code == 0
    (tmp_path / "x.pt").write_bytes(b"0")
    one_line(cli("eval", str(tmp_path / "x.pt")), "not a .safetensors file")


def test_eval_overrides_on_wrong_checkpoints(cli, tmp_path, moe_ckpt):
    import timm

    kw = {"depth": 1, "img_size": 32, "num_classes": 10}
    dense = save(Checkpoint(timm.create_model("vit_tiny_patch16_224", **kw), {"name": "vit_tiny_patch16_224",
                                                                            "kwargs": kw}), tmp_path / "dense").parent
    one_line(cli("eval", str(dense), "--top-k", "0"), "need an MoE model")
    one_line(cli("eval", str(dense), "--capacity-factor", "0"), "need an MoE model")
    ck = load_checkpoint(moe_ckpt)
    for _, m in ck.model.named_modules():
        if hasattr(m, "reconfigure"):
            m.reconfigure(gate="expert_choice")
    ec = save(ck, tmp_path / "ec").parent
    one_line(cli("eval", str(ec), "--top-k", "1"), "expert_choice")
    one_line(cli("eval", str(moe_ckpt), "--capacity-factor", "nan"), "--capacity-factor must be a finite number")


def test_metadata_cannot_smuggle_loader_arguments(cli, tmp_path, moe_ckpt):
    meta = read_metadata(moe_ckpt / "model.safetensors")
    arch = json.loads(meta["architecture"])
    arch["kwargs"]["checkpoint_path"] = str(tmp_path / "other.pth")
    path = tmp_path / "evil.safetensors"
    safetensors.torch.save_file(read_tensors(moe_ckpt / "model.safetensors"), str(path),
                                metadata={**meta, "architecture": json.dumps(arch)})
    one_line(cli("eval", str(path)), "`architecture.kwargs.checkpoint_path` is not an architecture argument")


def image_folder(root, classes: int, name: str = "class{:02d}"):
    """``root/<class>/a.png``: one random 32x32 image per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / name.format(c)
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / "a.png")
    return rng


def test_image_folders_checked_against_the_model(cli, tmp_path, moe_ckpt):
    import numpy as np
    from PIL import Image

    rng = image_folder(tmp_path / "twelve", 12)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(flat / "a.png")
    for cmd in ("eval", "inspect"):
        one_line(cli(cmd, str(moe_ckpt), "--data", str(tmp_path / "twelve")), "12 classes but the model's head has 10")
        one_line(cli(cmd, str(moe_ckpt), "--data", str(flat)), "one subfolder per class")


def test_nan_weights_are_reported(cli, tmp_path, moe_ckpt):
    ck = load_checkpoint(moe_ckpt)
    with torch.no_grad():
        ck.model.head.weight[0, 0] = float("nan")
    path = save(ck, tmp_path / "nan").parent
    r = cli("eval", str(path), "--data", "digits", "--metric", "accuracy")
    assert r.exit_code == 0 and "warning:" in r.stderr and "NaN or inf" in r.stderr


def test_files_respect_umask_and_stale_temp_files_go(tmp_path, moe_ckpt):
    old = os.umask(0o022)
    try:
        stale = tmp_path / "out" / ".model.safetensors.abc123.tmp"
        stale.parent.mkdir()
        stale.write_bytes(b"half")
        path = save(load_checkpoint(moe_ckpt), tmp_path / "out")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644) and not stale.exists()


def test_decoder_named_by_a_checkpoint_is_never_run(cli, tmp_path, torch_hub):
    """A downloaded checkpoint must not run code: the decoder in its metadata is imported only on request."""
    from conftest import seed_alexnet

    from moe_cli.data.tokens import synthetic_tokens, write_tokens
    from moe_cli.recipe import load_recipe
    from moe_cli.train.loop import train

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"import pathlib, torch\npathlib.Path({str(marker)!r}).write_text('x')\n"
                    "def decode(t):\n    return torch.zeros(*t.shape[:2], 3, 32, 32)\n")
    for split, seed in (("train", 0), ("validation", 1)):
        write_tokens(tmp_path / "tok", split, synthetic_tokens(16, 2, 2, 2, 8, seed), 8)
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "run", task="masked-tokens",
                     model={"source": "maskgit_video", "pretrained": False, "kwargs": {
                         "frames": 2, "height": 2, "width": 2, "vocab_size": 8, "embed_dim": 16, "depth": 1,
                         "num_heads": 2}},
                     data={"name": "tokens", "root": str(tmp_path / "tok")}, train={"steps": 1, "batch_size": 8},
                     masked_tokens={"decoder": f"{evil}:decode"})
    final = train(load_recipe(f)).final.parent
    seed_alexnet(torch_hub)
    r = cli("eval", str(final), "--metric", "lpips", "--json")
    assert r.exit_code == 0 and "--trust-checkpoint-code" in json.loads(r.stdout)["lpips"]["skipped"]
    assert not marker.exists()
    assert cli("eval", str(final), "--metric", "lpips", "--trust-checkpoint-code").exit_code == 0
    assert marker.exists()


def test_corrupt_image_is_named_not_skipped(cli, tmp_path, moe_ckpt):
    image_folder(tmp_path / "imgs", 2, "class{}")
    (tmp_path / "imgs" / "class1" / "broken.png").write_bytes(b"\x89PNG not really")
    one_line(cli("eval", str(moe_ckpt), "--data", str(tmp_path / "imgs"), "--metric", "accuracy"),
             "broken.png is not a readable image")


def test_user_text_in_an_error_line_is_printed_as_given(cli, tmp_path):
    one_line(cli("finetune", str(tmp_path / "[bold]run.yaml")), "[bold]run.yaml")
    one_line(cli("upcycle", *M, "--gate", "[red]x"), "'[red]x' is not one of")
