"""GENIE: a tiny model written in the released layout (config.json + model.safetensors) loads key for key from a
folder and from a seeded Hub cache, computes what its definition says (factorised embedding, mask token, causal
time, muP scale), upcycles exactly, reads 1X data folders, trains and evaluates."""

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import run_moe, seed_alexnet, write_recipe

from moe_cli.data.genie import clip_starts, genie_dataset, write_genie_folder
from moe_cli.errors import CheckpointError
from moe_cli.io.checkpoint import load_checkpoint
from moe_cli.io.sources import load_source
from moe_cli.models.genie import Genie, GenieConfig
from moe_cli.models.surgery import upcycled_copy
from moe_cli.models.upcycle import max_output_diff

TINY = {"num_layers": 2, "num_heads": 2, "d_model": 64, "T": 4, "S": 16, "image_vocab_size": 64,
        "num_factored_vocabs": 2, "use_mup": True, "qk_norm": False}
VARIANTS = [{}, {"qk_norm": True}, {"use_mup": False}, {"qkv_bias": True, "proj_bias": False, "mlp_bias": False},
            {"mlp_ratio": 2.5}]
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def tiny_genie(seed: int = 0, **over) -> Genie:
    torch.manual_seed(seed)
    model = Genie(GenieConfig(**{**TINY, **over}))
    with torch.no_grad():  # pos/mask embeddings start at 0 in the original: make them matter here
        model.pos_embed_TSC.normal_(0, 0.5)
        model.token_embed.mask_token_embed.normal_(0, 0.5)
    return model.eval()


def write_release(folder: Path, model: Genie) -> Path:
    """The released layout: flat config.json as huggingface_hub writes it, F32 model.safetensors, README.md."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**asdict(model.cfg), "factored_vocab_size": model.cfg.factored_vocab_size}
    (folder / "config.json").write_text(json.dumps(cfg, sort_keys=True, indent=2))
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "README.md").write_text("GENIE\n")
    return folder


def tokens(model: Genie, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return model.example_input(batch, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("over", VARIANTS)
def test_folder_loads_key_for_key(tmp_path, over):
    model = tiny_genie(**over)
    ck = load_source(str(write_release(tmp_path / "g", model)), pretrained=True)
    assert list(ck.model.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ck.model.state_dict().values(), model.state_dict().values(),
                                                    strict=True))
    x = tokens(model)
    out = ck.model.eval()(x)
    assert out.shape == (2, 2 * 8, 4, 4, 4)  # (B, F*V, T, H, W)
    torch.testing.assert_close(out, model(x))
    has_norms = not model.cfg.qk_norm
    assert ("decoder.layers.0.norm1.weight" in ck.model.state_dict()) == has_norms
    assert ("decoder.layers.0.spatial_attn.norm.weight" in ck.model.state_dict()) == model.cfg.qk_norm


def test_missing_or_unexpected_key_is_one_line(tmp_path, cli):
    folder = write_release(tmp_path / "g", tiny_genie())
    state = safetensors.torch.load_file(str(folder / "model.safetensors"))
    del state["decoder.layers.1.mlp.fc2.bias"]
    safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing `decoder.layers.1.mlp.fc2.bias`"):
        load_source(str(folder))
    r = cli("upcycle", str(folder), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "decoder.layers.1.mlp.fc2.bias" in r.stderr


def test_factorised_embedding_and_mask_token():
    model = tiny_genie()
    emb = model.token_embed
    x = torch.tensor([[3 + 8 * 5, 64]])  # digits (3, 5); the mask id
    out = emb(x)
    torch.testing.assert_close(out[0, 0], emb.factored_embeds[0].weight[3] + emb.factored_embeds[1].weight[5])
    torch.testing.assert_close(out[0, 1], emb.mask_token_embed[0])


def test_temporal_attention_is_causal():
    model = tiny_genie()
    x = tokens(model)
    y = x.clone()
    y[:, 3] = (y[:, 3] + 1) % 64  # change the last frame only
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :, :3], b[:, :, :3])  # earlier frames cannot see a later one
    z = x.clone()
    z[:, 0] = (z[:, 0] + 1) % 64
    assert (model(z)[:, :, 3] - a[:, :, 3]).abs().max() > 1e-4  # a later frame does see an earlier one


@pytest.mark.parametrize("use_mup", [True, False])
def test_attention_scale_and_mup_readout_by_hand(use_mup):
    model = tiny_genie(use_mup=use_mup)
    attn = model.decoder.layers[0].spatial_attn
    hd = 32
    assert attn.scale == (8 / hd if use_mup else hd ** -0.5)
    x = torch.randn(1, 5, 64)
    q, k, v = attn.qkv(x).reshape(1, 5, 3, 2, hd).permute(2, 0, 3, 1, 4)
    weights = ((q * attn.scale) @ k.transpose(-1, -2)).softmax(-1)
    want = attn.proj((weights @ v).transpose(1, 2).reshape(1, 5, 64))
    torch.testing.assert_close(attn(x), want)
    assert model.readout_div == (64 / 256 if use_mup else 1.0)


@pytest.mark.parametrize("k", [1, 2])
def test_upcycled_genie_computes_the_dense_model(k):
    model = tiny_genie()
    sparse, layout = upcycled_copy(model, experts=4, k=k)
    assert layout.layers == ("decoder.layers.0.mlp", "decoder.layers.1.mlp")
    diff, scale = max_output_diff(model, sparse, tokens(model))
    assert diff <= 1e-5 * max(1.0, scale)


def seed_hub(root: Path, model: Genie, repo_id: str = "1x-technologies/GENIE_35M") -> None:
    repo = root / f"models--{repo_id.replace('/', '--')}"
    write_release(repo / "snapshots" / COMMIT, model)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def test_upcycle_from_the_hub_cache_offline(tmp_path):
    model = tiny_genie()
    seed_hub(tmp_path / "hub", model)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}
    r = run_moe("upcycle", "hf-hub:1x-technologies/GENIE_35M", "--experts", "4", "--k", "2", "--out",
                str(tmp_path / "o"), env=env)
    assert r.returncode == 0, r.stderr
    assert "verify: max |dense - moe|" in r.stdout and "ok" in r.stdout
    ck = load_checkpoint(tmp_path / "o")
    assert ck.architecture["name"] == "genie" and ck.moe.experts == 4
    x = tokens(model)
    torch.testing.assert_close(ck.model(x), model(x), rtol=0, atol=1e-5)  # the hub weights, not random ones


def synthetic_1x(root: Path, n: int = 300, seed: int = 0) -> np.ndarray:
    """A 1X-format folder of 4x4 tokens (vocab 64) with two segments: a pattern drifting one step per image."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 64, (4, 4))
    video = np.stack([(base + i // 3) % 64 for i in range(n)])
    segments = np.array([0] * (n // 2) + [1] * (n - n // 2))
    write_genie_folder(root, video, segments, 64)
    return video


def test_clip_windows_respect_segments_and_overlaps(tmp_path):
    segments = np.array([0] * 25 + [1] * 15)
    assert clip_starts(segments, 4, 3, False).tolist() == list(range(16)) + list(range(25, 31))
    assert clip_starts(segments, 4, 3, True).tolist() == [0, 1, 2, 12, 13, 14, 25, 26, 27]
    video = synthetic_1x(tmp_path / "val_v1.1", n=40)  # segments: images 0-19 and 20-39
    ds = genie_dataset(tmp_path / "val_v1.1", (4, 4, 4), 64, training=False, stride=3)
    assert ds.starts.tolist() == [0, 1, 2, 20, 21, 22]
    clip = ds[3][0]
    assert clip.shape == (4, 4, 4) and np.array_equal(clip.numpy(), video[[20, 23, 26, 29]])


def test_data_format_errors_are_one_line(tmp_path):
    from moe_cli.errors import ConfigError

    synthetic_1x(tmp_path / "d", n=40)
    (tmp_path / "d" / "segment_ids.bin").write_bytes(b"\0" * 12)
    with pytest.raises(ConfigError, match="segment_ids.bin: expected 160 bytes"):
        genie_dataset(tmp_path / "d", (4, 4, 4), 64, training=True)
    with pytest.raises(ConfigError, match="metadata.json"):
        genie_dataset(tmp_path / "nowhere", (4, 4, 4), 64, training=True)


def test_training_lowers_the_masked_ce_and_eval_reports_ce_accuracy_lpips(tmp_path, cli, torch_hub):
    from moe_cli.recipe import load_recipe
    from moe_cli.tasks.genie import GenieTask
    from moe_cli.train.loop import train

    model = tiny_genie(use_mup=False)
    src = write_release(tmp_path / "genie", model)
    for split, seed in (("train_v1.1", 0), ("val_v1.1", 1)):
        synthetic_1x(tmp_path / "data" / split, seed=seed)
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "run", task="genie",
                     model={"source": str(src), "pretrained": True, "kwargs": {},
                            "upcycle": {"experts": 4, "k": 2}},
                     data={"name": "genie", "root": str(tmp_path / "data"), "train_split": "train_v1.1",
                           "val_split": "val_v1.1", "stride": 3},
                     optim={"name": "adam", "lr": 3e-3, "weight_decay": 0.0}, schedule={"warmup_steps": 0},
                     train={"steps": 40, "batch_size": 8, "log_every": 10},
                     genie={"eval_max_batches": 2})
    recipe = load_recipe(f)
    task = GenieTask()
    batch = (genie_dataset(tmp_path / "data" / "val_v1.1", (4, 4, 4), 64, False, 3)[0][0][None].repeat(8, 1, 1, 1),)

    def fixed_loss(m):
        torch.manual_seed(123)
        with torch.no_grad():
            return task.loss(m.eval(), batch)[0].item()

    before = fixed_loss(model)
    result = train(recipe, device="cpu")
    after = fixed_loss(result.ckpt.model)
    assert after < before - 0.5, (before, after)
    assert set(result.eval) >= {"ce", "accuracy"}
    seed_alexnet(torch_hub)
    r = cli("eval", str(result.final.parent), "--metric", "ce,accuracy,lpips", "--batch-size", "16", "--decoder",
            "moe_cli.data.tokens:palette_decoder", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert math.isfinite(out["ce"]) and 0 <= out["accuracy"]["top1"] <= 1 and 0 <= out["lpips"] < 1
    assert abs(out["ce"] - result.eval["ce"]) < 1e-4  # the protocol's CE is deterministic
