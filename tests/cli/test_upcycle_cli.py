"""`moe upcycle` / `moe export` end to end, and every bad-input case: one line on stderr, exit 2, no output file."""

import pytest
import safetensors.torch
import torch
from conftest import model_args, run_moe, tiny_model

import moe_cli
from moe_cli.io.checkpoint import read_metadata
from moe_cli.models.probe import probe_batch

VIT = ["vit_tiny_patch16_224", "--no-pretrained", *model_args("vit")]


def test_upcycle_verifies_saves_and_loads(cli, tmp_path):
    out = tmp_path / "moe"
    r = cli("upcycle", *VIT, "--experts", "4", "--k", "2", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "verify: max |dense - moe| =" in r.output and "ok" in r.output
    verify = next(line for line in r.output.splitlines() if line.startswith("verify:"))
    assert verify.endswith(" ok") and len(verify) <= 80  # one line in an 80-column terminal
    assert "params active / token" in r.output
    model = moe_cli.load(out)
    assert len([m for m in model.modules() if type(m).__name__ == "MoEMlp"]) == 2
    meta = read_metadata(out / "model.safetensors")
    assert meta["source"] == "vit_tiny_patch16_224" and '"experts": 4' in meta["moe"]


def test_export_dtype_round_trip(cli, tmp_path):
    assert cli("upcycle", *VIT, "--experts", "2", "--k", "1", "--out", str(tmp_path / "m")).exit_code == 0
    r = cli("export", str(tmp_path / "m"), "--out", str(tmp_path / "m.bf16.safetensors"), "--dtype", "bf16")
    assert r.exit_code == 0, r.output
    tensors = safetensors.torch.load_file(str(tmp_path / "m.bf16.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    full, half = moe_cli.load(tmp_path / "m"), moe_cli.load(tmp_path / "m.bf16.safetensors")
    assert {p.dtype for p in half.parameters()} == {torch.float32}  # loads into the model's precision and runs
    x = probe_batch(full)
    torch.testing.assert_close(half(x), full(x), rtol=0.05, atol=0.1)


def assert_user_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in r.output


def test_k_larger_than_experts(cli, tmp_path):
    r = cli("upcycle", *VIT, "--experts", "2", "--k", "3", "--out", str(tmp_path / "o"))
    assert_user_error(r, "--k", "--experts (2)")
    assert not (tmp_path / "o").exists()


def test_experts_below_one(cli, tmp_path):
    assert_user_error(cli("upcycle", *VIT, "--experts", "0", "--out", str(tmp_path / "o")), "--experts")


def test_missing_file(cli, tmp_path):
    assert_user_error(cli("upcycle", str(tmp_path / "nope.safetensors"), "--arch", "vit_tiny_patch16_224"),
                      "file not found", "nope.safetensors")
    assert_user_error(cli("export", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")),
                      "checkpoint not found")


def test_corrupt_file(cli, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    r = cli("upcycle", str(bad), "--arch", "vit_tiny_patch16_224", "--out", str(tmp_path / "o"))
    assert_user_error(r, "bad.safetensors", "not a valid safetensors file")
    assert not (tmp_path / "o").exists()


def test_unknown_model(cli):
    assert_user_error(cli("upcycle", "vit_smal", "--no-pretrained"), "unknown model `vit_smal`", "did you mean")


def test_architecture_mismatch(cli, tmp_path):
    f = tmp_path / "w.safetensors"
    safetensors.torch.save_file(tiny_model("vit").state_dict(), str(f))
    r = cli("upcycle", str(f), "--arch", "vit_tiny_patch16_224", "--model-arg", "depth=3",
            "--model-arg", "img_size=32", "--model-arg", "num_classes=10", "--out", str(tmp_path / "o"))
    assert_user_error(r, "does not match the architecture", "blocks.2")
    r = cli("upcycle", str(f), "--arch", "vit_small_patch16_224", *model_args("vit")[:4], "--out", str(tmp_path / "o"))
    assert_user_error(r, "has shape")
    assert not (tmp_path / "o").exists()


def test_bad_export_dtype(cli, tmp_path):
    assert_user_error(cli("export", str(tmp_path), "--out", str(tmp_path / "x.safetensors"), "--dtype", "int8"),
                      "--dtype")


def test_module_entry_point_subprocess(tmp_path):
    r = run_moe("upcycle", *VIT, "--experts", "2", "--k", "5", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert run_moe("--version").stdout.startswith("moe-cli ")


def test_failed_verification_exits_1_and_writes_nothing(cli, tmp_path):
    r = cli("upcycle", *VIT, "--tolerance", "0", "--out", str(tmp_path / "o"))
    assert r.exit_code == 1 and "FAILED" in r.output
    assert not (tmp_path / "o").exists()


def test_pretrained_weights_unavailable_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HOME": str(tmp_path / "hf")}
    r = run_moe("upcycle", "vit_tiny", "--pretrained", "--out", str(tmp_path / "o"), env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not fetch pretrained weights for `vit_tiny_patch16_224`" in lines[0]
    assert "--no-pretrained" in lines[0] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needle", [
    (["export", "x", "--out", "y.safetensors", "--dtype", "int8"], "'int8' is not one of 'fp32', 'bf16', 'fp16'"),
    (["upcycle"], "Missing argument"),
    (["frobnicate"], "no command `frobnicate`"),
    (["upcyle"], "did you mean `upcycle`?"),
    (["upcycle", "vit_tiny", "--gate", "sometimes"], "--gate"),
    (["eval", "x", "--precision", "fp8"], "--precision"),
])
def test_usage_errors_are_one_line(cli, args, needle):
    assert_user_error(cli(*args), needle)


def test_usage_error_from_the_real_entry_point():
    r = run_moe("upcycle", "vit_tiny", "--experts", "many")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: moe upcycle:")
