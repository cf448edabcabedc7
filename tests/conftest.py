import os
import random
import socket
import subprocess
import sys

# Triton decides at import time whether to interpret kernels: on a machine without an NVIDIA GPU, run the Triton
# MoE kernels on CPU tensors through its interpreter (set before torch, which may import Triton, is imported)
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"
# training and eval in tests run on CPU also where a GPU is present (tiny models; CUDA tests pick their device)
os.environ.setdefault("MOE_DEVICE", "cpu")
# under pytest-xdist (the default, pyproject's addopts) the workers already share the cores: one BLAS thread each,
# also for the processes the tests start
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import timm
import torch
from typer.testing import CliRunner

from moe_cli.cli.app import app

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER is not None:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(items):
    """Tests marked ``long`` first: the parallel workers then finish together (longest jobs first)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def free_port() -> int:
    """A free TCP port for a process group's rendezvous. Each pytest-xdist worker draws from a range of its own
    (the kernel's bind(0) hands out even ports only, so a residue rule would starve odd workers), so two workers
    never pick the same one; a port another program holds is skipped."""
    index = int(WORKER[2:]) if WORKER else 0
    rng = random.Random(os.getpid())
    while True:
        port = 20000 + 1000 * index + rng.randrange(1000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


# tiny configurations of real timm families, each with a different FFN type
TINY = {
    "vit": ("vit_tiny_patch16_224", {"depth": 2, "img_size": 32, "num_classes": 10}),
    "eva_swiglu": ("eva02_tiny_patch14_224", {"depth": 2, "img_size": 28, "scale_mlp": True, "num_classes": 10}),
    "eva_glu": ("eva02_tiny_patch14_224", {"depth": 2, "img_size": 28, "num_classes": 10}),
    "convnext": ("convnext_atto", {"depths": (1, 1, 1, 1), "ls_init_value": 1.0, "num_classes": 10}),
}


def tiny_model(family: str = "vit", seed: int = 0) -> torch.nn.Module:
    name, kwargs = TINY[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    torch.nn.init.normal_(model.get_classifier().weight, std=0.5)  # timm zero-inits some heads
    return model.eval()


def model_args(family: str = "vit") -> list[str]:
    """The --model-arg options that build TINY[family] from the CLI."""
    args = []
    for key, value in TINY[family][1].items():
        value = list(value) if isinstance(value, tuple) else value
        args += ["--model-arg", f"{key}={value}"]
    return args


def run_moe(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run the real `python -m moe_cli` in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "moe_cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


def dispatcher_run(dispatcher, moe, x: torch.Tensor, amp: torch.dtype | None = None):
    """One dispatcher on ``moe``'s routing of ``x`` (under ``amp`` autocast; None: fp32): (slots per expert,
    {"y": output as fp32, "x": its gradient, "router": the router weight's, and each expert parameter's by
    name}), the gradients of a fixed linear function of the output."""
    xi = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        y, counts = dispatcher(xi, moe.router(xi), moe.experts)
    y = y.float()
    g = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
    names, params = zip(*moe.experts.named_parameters(), strict=True)
    grads = torch.autograd.grad((y * g).sum(), [xi, moe.router.weight, *params])
    return counts, dict(zip(("y", "x", "router", *names), (y, *grads), strict=True))


def one_line(r, needle, code=2):
    """A CliRunner result that is one `error:` line on stderr containing ``needle``, exit ``code``, no traceback."""
    assert r.exit_code == code, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.output


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


TINY_RECIPE = {
    "model": {"source": "vit_tiny_patch16_224", "pretrained": False,
              "kwargs": {"img_size": 32, "patch_size": 16, "depth": 2, "embed_dim": 64, "num_heads": 2,
                         "num_classes": 10}},
    "data": {"name": "digits"},
    "optim": {"lr": 1e-3},
    "schedule": {"warmup_steps": 5},
    "train": {"steps": 12, "batch_size": 32, "log_every": 2, "seed": 0},
    "moe": {"load_balance": 0.01, "z_loss": 0.001},
}


def write_recipe(path, output, **sections) -> str:
    """A tiny digits recipe (depth-2 ViT, 32 px) with ``sections`` merged over the defaults."""
    import copy

    import yaml

    data = copy.deepcopy(TINY_RECIPE)
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    data["output"] = str(output)
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def torch_hub(tmp_path):
    """An empty torch hub cache of the test's own (LPIPS looks for its AlexNet backbone there)."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def seed_alexnet(hub) -> None:
    """Put a seeded, randomly initialised AlexNet where torchvision caches the ImageNet one (no download)."""
    import torchvision

    from moe_cli.models.lpips import ALEXNET_FILE

    (hub / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), hub / "checkpoints" / ALEXNET_FILE)


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def seed_hub_cache(cache, repo_id, folder):
    """Put ``folder``'s files where huggingface_hub keeps a downloaded snapshot of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / HUB_COMMIT
    snap.mkdir(parents=True)
    for p in folder.iterdir():
        (snap / p.name).write_bytes(p.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
