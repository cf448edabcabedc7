"""Refusals and edge inputs by area: 16-bit exports, upcycle options checked up front, devices and recipe ranges,
checkpoint metadata, GENIE inputs, user decoders, divergence. Each case ends as one `error:` line with exit 2 and
nothing written, or, where the input is fine, works. Table-driven where the cases share a shape."""

import json
import math
import resource
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from conftest import model_args, one_line, write_recipe
from PIL import Image

from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint, read_metadata, read_tensors, save
from moe_cli.models.genie import Genie, GenieConfig

M = ["vit_tiny_patch16_224", "--no-pretrained", *model_args("vit")]
GENIE = {"num_layers": 2, "num_heads": 2, "d_model": 64, "T": 4, "S": 16, "image_vocab_size": 64,
         "num_factored_vocabs": 2, "use_mup": True, "qk_norm": False}


@pytest.fixture
def moe_ckpt(cli, tmp_path):
    assert cli("upcycle", *M, "--experts", "4", "--k", "2", "--out", str(tmp_path / "m")).exit_code == 0
    return tmp_path / "m"


def with_metadata(src, dst, **changes):
    """A copy of checkpoint ``src`` whose metadata entries ``changes`` (JSON-encoded unless str) are replaced."""
    meta = read_metadata(src / "model.safetensors")
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in changes.items()})
    dst.mkdir(parents=True)
    safetensors.torch.save_file(read_tensors(src / "model.safetensors"), str(dst / "model.safetensors"), metadata=meta)
    return dst


# ---------------------------------------------------------------------------------------------- 16-bit exports


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_16_bit_export_evaluates_merges_and_prunes(cli, moe_ckpt, tmp_path, dtype):
    export = tmp_path / f"m.{dtype}.safetensors"
    assert cli("export", str(moe_ckpt), "--out", str(export), "--dtype", dtype).exit_code == 0
    r = cli("eval", str(export), "--data", "digits", "--metric", "accuracy,ce", "--json")
    assert r.exit_code == 0, r.output
    full = json.loads(cli("eval", str(moe_ckpt), "--data", "digits", "--metric", "accuracy,ce", "--json").stdout)
    assert json.loads(r.stdout)["ce"] == pytest.approx(full["ce"], rel=0.05)  # the same model, rounded weights
    assert cli("merge", str(export), "--experts", "2", "--calib", "digits", "-o",
               str(tmp_path / "merged")).exit_code == 0
    assert cli("prune", str(export), "--keep", "2", "--calib", "digits", "-o", str(tmp_path / "pruned")).exit_code == 0


# ---------------------------------------------------------------------------------------------- upcycle options


@pytest.mark.parametrize("args,needle", [
    (["--gate", "top_p", "--no-normalize"], "upcycling invariant"),
    (["--k", "1", "--no-normalize"], "upcycling invariant"),
    (["--gate", "soft", "--no-normalize"], "--normalize only applies to --gate topk and top_p"),
    (["--gate", "top_p", "--capacity-factor", "0.25"], "gate top_p does not drop tokens"),
    (["--gate", "soft", "--eval-capacity-factor", "2"], "gate soft does not drop tokens"),
])
def test_upcycle_refuses_up_front(cli, tmp_path, args, needle):
    one_line(cli("upcycle", *M, *args, "--out", str(tmp_path / "o")), needle)
    assert not (tmp_path / "o").exists()


def test_normalize_false_is_fine_where_the_weights_add_up(cli, tmp_path):
    r = cli("upcycle", *M, "--experts", "2", "--k", "2", "--no-normalize", "--out", str(tmp_path / "o"))
    assert r.exit_code == 0 and "ok" in r.output


def test_kmeans_router_with_too_few_calibration_tokens(cli, tmp_path):
    (tmp_path / "calib" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "calib" / "a" / "0.png")  # 1 image: 5 tokens
    one_line(cli("upcycle", *M, "--experts", "8", "--router-init", "kmeans", "--calib", str(tmp_path / "calib"),
                 "--out", str(tmp_path / "o")), "fewer than the 8 experts")
    assert not (tmp_path / "o").exists()


def test_experts_beyond_a_memory_limit_is_one_line(tmp_path):
    """Under `ulimit -v`, the memory check (or, past it, the allocator) gives one line, not a traceback."""
    limit = 7 * 2 ** 30

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "moe_cli", "upcycle", *M, "--experts", "2000", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, preexec_fn=cap, timeout=300,
                       env={**__import__("os").environ, "MOE_DEVICE": "cpu"})
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "memory" in lines[0] or "needs about" in lines[0]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- devices, ranges


def test_unsupported_devices_are_refused(cli, moe_ckpt, tmp_path, monkeypatch):
    one_line(cli("--device", "meta", "eval", str(moe_ckpt)), "--device must be cpu, cuda or cuda:N")
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out")
    one_line(cli("--device", "meta", "finetune", f), "--device must be cpu, cuda or cuda:N")
    monkeypatch.setenv("MOE_DEVICE", "meta")
    one_line(cli("eval", str(moe_ckpt)), "MOE_DEVICE must be cpu, cuda or cuda:N, got 'meta'")


@pytest.mark.parametrize("assignment,needle", [
    ("optim.lr=1e39", "`optim.lr` in r.yaml must be a number in (0, 100]"),
    ("genie.eval_max_batches=0", "`genie.eval_max_batches` in r.yaml must be an integer >= 1 or null"),
    ("genie.eval_max_batches=-1", "`genie.eval_max_batches`"),
    ("genie.maskgit_steps=0", "`genie.maskgit_steps`"),
    ("data.stride=0", "`data.stride`"),
    ("data.std=[0, 1, 1]", "`data.std` in r.yaml must be three finite numbers > 0"),
    ("data.mean=[0.5, 0.5]", "`data.mean` in `--set data.mean=[0.5, 0.5]` must be list of 3 numbers"),
    ("data.interpolation=cubic", "`data.interpolation` in r.yaml must be one of"),
    ("data.crop_pct=1.5", "`data.crop_pct` in r.yaml must be a number in [0.05, 1]"),
    ("data.crop_pct=1e-9", "`data.crop_pct` in r.yaml must be a number in [0.05, 1] (images are resized to size / "
                           "crop_pct)"),  # PIL's resize overflowed
    ("data.mean=[1e30, 0, 0]", "`data.mean` in r.yaml: normalised pixels (x - mean) / std reach 2e+30 (x in [0, 1], "
                               "std taken as 0.5), beyond +-10000"),  # the run died with a non-finite loss
    ("data.std=[1e-30, 1, 1]", "`data.std` in r.yaml: normalised pixels (x - mean) / std reach 5e+29"),
    ("train.expert_parallel=0", "`train.expert_parallel` in r.yaml must be an integer >= 1"),
    ("train.parallel=zero3", "`train.parallel` in `--set train.parallel=zero3` must be 'ddp' | 'fsdp'"),
])
def test_recipe_ranges(cli, tmp_path, assignment, needle):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out")
    # a value given with --set is checked as that --set, when the config is made
    one_line(cli("finetune", f, "--set", assignment), needle.replace("in r.yaml", f"in `--set {assignment}`"))
    assert not (tmp_path / "out").exists()


def test_capacity_override_on_a_gate_that_does_not_drop_is_refused(cli, tmp_path):
    assert cli("upcycle", *M, "--gate", "top_p", "--out", str(tmp_path / "p")).exit_code == 0
    one_line(cli("eval", str(tmp_path / "p"), "--capacity-factor", "0.01"), "gate top_p does not drop tokens")


# ---------------------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("arch,needle", [
    ({"name": "vit_tiny_patch16_224", "kwargs": {"depth": 2, "img_size": 32, "num_classes": 10,
                                                 "act_layer": "os.system"}}, "cannot build timm model"),
    ({"name": "local-dir:/tmp", "kwargs": {}}, "not a registered timm architecture"),
    ({"name": "hf-hub:org/name", "kwargs": {}}, "not a registered timm architecture"),
])
def test_checkpoint_metadata_cannot_name_code_or_other_files(cli, moe_ckpt, tmp_path, arch, needle):
    bad = with_metadata(moe_ckpt, tmp_path / "bad", architecture=arch)
    one_line(cli("eval", str(bad)), needle)


def test_a_folder_config_json_cannot_pass_checkpoint_path(cli, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    safetensors.torch.save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "model_args": {
        "img_size": 32, "depth": 1, "checkpoint_path": str(tmp_path / "elsewhere.pth")}}))
    one_line(cli("upcycle", str(folder), "--out", str(tmp_path / "o")), "`architecture.kwargs.checkpoint_path`")


def test_merge_and_prune_refuse_a_router_with_non_finite_statistics(cli, moe_ckpt, tmp_path):
    tensors = read_tensors(moe_ckpt / "model.safetensors")
    tensors["blocks.0.mlp.router.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan"
    bad.mkdir()
    safetensors.torch.save_file(tensors, str(bad / "model.safetensors"), metadata=read_metadata(
        moe_ckpt / "model.safetensors"))
    one_line(cli("merge", str(bad), "--experts", "2", "--calib", "digits", "-o", str(tmp_path / "merged")),
             "non-finite logits")
    one_line(cli("prune", str(bad), "--keep", "2", "--calib", "digits", "-o", str(tmp_path / "pruned")),
             "non-finite logits")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "pruned").exists()


# ---------------------------------------------------------------------------------------------- GENIE


@pytest.mark.parametrize("field,value,needle", [
    ("num_heads", 0, "`num_heads` must be at least 1"),
    ("num_factored_vocabs", 0, "`num_factored_vocabs` must be at least 1"),
    ("num_layers", 10 ** 9, "more than this machine's memory"),
    ("d_model", "x", "`d_model` must be int"),
])
def test_genie_configs_from_arguments_and_folders(cli, tmp_path, field, value, needle):
    one_line(cli("upcycle", "genie", "--no-pretrained", *[a for k, v in {**GENIE, field: value}.items()
                                                          for a in ("-m", f"{k}={v}")], "--out", str(tmp_path / "o")),
             needle)
    folder = tmp_path / "release"
    folder.mkdir()
    ok = Genie(GenieConfig(**GENIE))
    safetensors.torch.save_file(ok.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**GENIE, field: value}))
    one_line(cli("upcycle", str(folder), "--out", str(tmp_path / "o")), needle)
    assert not (tmp_path / "o").exists()


def genie_data(root, video, vocab=64):
    from moe_cli.data.genie import write_genie_folder

    return write_genie_folder(root, video, np.zeros(len(video), dtype=np.int32), vocab)


@pytest.fixture
def genie_ckpt(tmp_path):
    genie_data(tmp_path / "data" / "val_v1.1", np.random.default_rng(0).integers(0, 64, (40, 4, 4)))
    model = Genie(GenieConfig(**GENIE))
    tc = {"maskgit_steps": 2, "eval_max_batches": 1, "seed": 42, "decoder": None,
          "data_root": str(tmp_path / "data"), "val_split": "val_v1.1", "stride": 3}
    return save(Checkpoint(model, {"name": "genie", "kwargs": GENIE}, task="genie", task_config=tc),
                tmp_path / "g").parent


def test_genie_checkpoint_evaluates(cli, genie_ckpt):
    r = cli("eval", str(genie_ckpt), "--metric", "ce,accuracy", "--json")
    assert r.exit_code == 0, r.output
    assert math.isfinite(json.loads(r.stdout)["ce"])


def test_genie_eval_table_speaks_per_clip_and_of_generated_frames(cli, genie_ckpt):
    """The task labels its rows (before: "accuracy top-1", "cross-entropy", "GFLOPs / image" for GENIE)."""
    r = cli("eval", str(genie_ckpt), "--metric", "ce,accuracy,flops,throughput")
    assert r.exit_code == 0, r.output
    for label in ("token accuracy (generated frames)", "cross-entropy (summed over factors)", "GFLOPs / clip",
                  "clips/s"):
        assert label in r.stdout, r.stdout
    for wrong in ("accuracy top-1", "GFLOPs / image", "img/s"):
        assert wrong not in r.stdout, r.stdout
    assert "clips_per_s" in json.loads(cli("eval", str(genie_ckpt), "--metric", "throughput", "--json").stdout)[
        "throughput"]


@pytest.mark.parametrize("change,needle", [
    ({"stride": 0}, "`task_config.stride`"),
    ({"maskgit_steps": 0}, "`task_config.maskgit_steps`"),
    ({"eval_max_batches": "x"}, "`task_config.eval_max_batches`"),
    ({"eval_max_batches": 0}, "`task_config.eval_max_batches`"),
])
def test_genie_metadata_ranges(cli, genie_ckpt, tmp_path, change, needle):
    tc = json.loads(read_metadata(genie_ckpt / "model.safetensors")["task_config"])
    bad = with_metadata(genie_ckpt, tmp_path / "bad", task_config={**tc, **change})
    one_line(cli("eval", str(bad), "--metric", "ce,accuracy"), needle)


@pytest.mark.parametrize("bad_id", [64, 64 + 1000, 2 ** 32 - 1])  # the mask id (= vocab), beyond, "negative" uint32
def test_genie_token_ids_are_checked_when_the_folder_opens(tmp_path, bad_id):
    from moe_cli.data.genie import genie_dataset

    video = np.random.default_rng(0).integers(0, 64, (40, 4, 4)).astype(np.int64)
    video[17, 2, 3] = bad_id
    genie_data(tmp_path / "d", video)
    with pytest.raises(ConfigError, match=f"video.bin: token id {bad_id} found, but ids must be in \\[0, 64\\)"):
        genie_dataset(tmp_path / "d", (4, 4, 4), 64, training=True)


def test_negative_token_ids_in_a_token_folder(tmp_path):
    from moe_cli.data.tokens import token_dataset, write_tokens

    tokens = np.random.default_rng(0).integers(0, 10, (4, 2, 2, 2))
    write_tokens(tmp_path, "train", tokens, 300)  # 300 > 256: stored as int16... or uint16
    spec = json.loads((tmp_path / "train.json").read_text())
    data = np.fromfile(tmp_path / spec["file"], dtype=spec["dtype"]).astype(np.int64)
    data[5] = -3
    spec["dtype"] = "int16"
    data.astype(np.int16).tofile(tmp_path / spec["file"])
    (tmp_path / "train.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="token id -3 found"):
        token_dataset(tmp_path, "train", (2, 2, 2), 300)


# ---------------------------------------------------------------------------------------------- user decoders


@pytest.mark.parametrize("source,needle", [
    ("def decode(t:\n", "cannot import"),  # a syntax error
    ("raise RuntimeError('no GPU for the VQ model')\ndef decode(t):\n    return t\n", "RuntimeError: no GPU"),
    ("def decode(t):\n    raise ValueError('bad tokens')\n", "raised ValueError: bad tokens"),
    ("import torch\ndef decode(t):\n    return torch.full((*t.shape[:2], 3, 8, 8), 255.0)\n", "in [-1, 1]"),
])
def test_a_failing_user_decoder_is_one_line_naming_it(tmp_path, source, needle):
    from moe_cli.models.decoders import decoded_frames, load_decoder

    (tmp_path / "dec.py").write_text(source)
    spec = f"{tmp_path / 'dec.py'}:decode"
    with pytest.raises(ConfigError) as e:
        decoded_frames(load_decoder(spec), torch.zeros(2, 3, 4, 4, dtype=torch.long), torch.device("cpu"))
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert "dec.py" in str(e.value) or "[-1, 1]" in str(e.value)


# ---------------------------------------------------------------------------------------------- divergence


def test_a_run_whose_final_eval_is_not_finite_publishes_nothing(tmp_path):
    """Before: a run that blew up on its last steps exited 0 and wrote final/ and summary.json with CE NaN."""
    from moe_cli.recipe import load_recipe
    from moe_cli.tasks.classify import ClassifyTask
    from moe_cli.train.loop import TrainingDiverged, train

    class BlowsUpAtTheEnd(ClassifyTask):  # the real task, whose final evaluation comes out non-finite
        def evaluate(self, model, loader, device, precision="fp32", lpips=None):
            out = super().evaluate(model, loader, device, precision, lpips)
            return {**out, "ce": float("nan")}

    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", train={"steps": 3, "ckpt_every": 2})
    with pytest.raises(TrainingDiverged, match="final evaluation gives a non-finite ce"):
        train(load_recipe(f), device="cpu", task=BlowsUpAtTheEnd())
    assert not (tmp_path / "out" / "final").exists() and not (tmp_path / "out" / "summary.json").exists()
    assert (tmp_path / "out" / "last" / "model.safetensors").exists()  # the last good checkpoint stays
