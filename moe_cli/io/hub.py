"""The Hugging Face Hub as a home for moe-cli checkpoints: `moe push` uploads a checkpoint folder with a
generated model card, and `hf-hub:org/name` loads such a repository back (through the local cache offline).

A pushed repository holds ``model.safetensors`` (the checkpoint, metadata included), ``config.json``
(``{"library_name": "moe-cli", ...}`` so loaders can tell it from a plain timm repository), ``README.md`` (the
model card: YAML metadata for the Hub, then the MoE layout, how it was made, eval results) and, when the run
folder has them, ``summary.json`` and the routing figure ``expert_load.png``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import WEIGHTS_NAME, Checkpoint, load_checkpoint, weights_path
from moe_cli.runtime import atomic_write

LIBRARY = "moe-cli"
FIGURE = "expert_load.png"


def is_repo_id(text: str) -> bool:
    """A Hub repository id: ORG/NAME, both parts non-empty."""
    return text.count("/") == 1 and all(text.split("/"))


def hub_config(ckpt: Checkpoint) -> dict:
    return {"library_name": LIBRARY, "format": "moe-cli/1", "architecture": ckpt.architecture["name"],
            "task": ckpt.task, "moe": ckpt.moe.to_dict() if ckpt.moe else None}


def is_moe_cli_repo(config: dict | None) -> bool:
    return isinstance(config, dict) and config.get("library_name") == LIBRARY


def _base_model(source: str) -> str | None:
    """The Hub id of the dense model the checkpoint came from, where it has one."""
    if source.startswith("hf-hub:"):
        return source.split(":", 1)[1]
    name = source.split("/")[-1]
    if "/" not in source and "." in name and not name.endswith(".safetensors"):  # timm name with a weight tag
        return f"timm/{name}"
    return None


def _upcycle_command(ckpt: Checkpoint) -> str:
    m = ckpt.moe
    cmd = f"moe upcycle {ckpt.source or ckpt.architecture['name']} --experts {m.experts} --k {m.k} --gate {m.gate}"
    if m.init != "copy":
        cmd += f" --init {m.init}"
    if m.capacity_factor is not None:
        cmd += f" --capacity-factor {m.capacity_factor}"
    return cmd


def _license(ckpt: Checkpoint) -> str | None:
    import timm

    name = ckpt.source if timm.is_model(ckpt.source.split(".", 1)[0]) else ckpt.architecture["name"]
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError):
        return None
    return getattr(cfg, "license", None) if cfg is not None else None


def model_card(ckpt: Checkpoint, repo_id: str, results: dict | None = None, figure: bool = False) -> str:
    """README.md for the Hub: YAML metadata (library, base model, tags, license), then the layout, the command
    that made it, eval results and the routing figure."""
    meta: dict = {"library_name": LIBRARY, "tags": ["moe-cli", "mixture-of-experts", "moe", "timm", ckpt.task]}
    if (base := _base_model(ckpt.source)) is not None:
        meta["base_model"] = base
    if (lic := _license(ckpt)) is not None:
        meta["license"] = lic
    m = ckpt.moe
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {repo_id.split('/')[-1]}", ""]
    if m is None:
        lines += [f"A dense `{ckpt.architecture['name']}` checkpoint written by moe-cli (`{ckpt.task}`).", ""]
    else:
        counts = m.layer_experts or (m.experts,) * len(m.layers)
        lines += [f"A Mixture-of-Experts `{ckpt.architecture['name']}` made by [moe-cli](https://pypi.org/project/"
                  f"moe-cli/) from `{ckpt.source or ckpt.architecture['name']}` ({m.init} upcycling).", "",
                  "| | |", "|---|---|", f"| MoE layers | {len(m.layers)} |",
                  f"| experts per layer | {', '.join(str(c) for c in dict.fromkeys(counts))} |",
                  f"| experts per token (k) | {'all' if m.gate == 'soft' else m.k} |", f"| gate | {m.gate} |",
                  f"| capacity factor | {m.capacity_factor if m.capacity_factor is not None else 'none'} |",
                  f"| expert init | {m.init} |", "", "Made with:", "", "```bash", _upcycle_command(ckpt), "```", ""]
    if results:
        lines += ["## Evaluation (the run's final evaluation)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()
                  if isinstance(v, (int, float)) and k != "step"]
        lines.append("")
    if figure:
        lines += ["## Routing", "", f"![expert load per layer]({FIGURE})", ""]
    lines += ["## Use", "", "```bash", "pip install moe-cli", f"moe eval hf-hub:{repo_id}", "```", "", "```python",
              "import moe_cli", f"model = moe_cli.load('hf-hub:{repo_id}')", "```", ""]
    return "\n".join(lines)


def stage(ckpt_dir: str | Path, repo_id: str, out: Path) -> list[Path]:
    """Write into ``out`` exactly the files `moe push` uploads for the checkpoint folder ``ckpt_dir``."""
    if not is_repo_id(repo_id):
        raise ConfigError(f"the repository must be ORG/NAME, got {repo_id!r}")
    weights = weights_path(ckpt_dir)
    ckpt = load_checkpoint(weights)
    run = weights.parent.parent if weights.parent.name == "final" else None  # a run folder around final/
    results = json.loads((run / "summary.json").read_text()) if run and (run / "summary.json").is_file() else None
    figure = next((p for p in (weights.parent / FIGURE, *((run / "inspect" / FIGURE,) if run else ()))
                   if p.is_file()), None)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, out / WEIGHTS_NAME)
    files = [out / WEIGHTS_NAME]
    for name, text in (("config.json", json.dumps(hub_config(ckpt), indent=2)),
                       ("README.md", model_card(ckpt, repo_id, results, figure is not None))):
        atomic_write(out / name, lambda p, text=text: Path(p).write_text(text))
        files.append(out / name)
    if results is not None:
        shutil.copyfile(run / "summary.json", out / "summary.json")
        files.append(out / "summary.json")
    if figure is not None:
        shutil.copyfile(figure, out / FIGURE)
        files.append(out / FIGURE)
    return files


def push(ckpt_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create (or reuse) the Hub repository and upload the staged files; returns the repository URL."""
    import tempfile

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        stage(ckpt_dir, repo_id, Path(tmp))
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=tmp, repo_id=repo_id, commit_message="Upload moe-cli checkpoint")
    return str(url)
