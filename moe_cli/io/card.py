"""Model cards and Hub configs for what `moe push` uploads and `moe export --format transformers` writes: the
metadata the Hub reads (``huggingface_hub.ModelCardData``: library, pipeline tag, base model, datasets, license
when known, eval results as ``model-index``), the chain of commands that made the model, and how to load it.

``config.json`` of a moe-cli repository names the library (so moe-cli knows its own repositories) and, for timm
architectures, holds what ``timm.create_model("hf-hub:...", pretrained=True)`` reads (``architecture``,
``num_classes``, ``model_args``, ``pretrained_cfg``): a dense model (a source, or an MoE merged back to one
expert) loads in plain timm.
"""

from __future__ import annotations

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from moe_cli.io.checkpoint import Checkpoint

LIBRARY = "moe-cli"
PIPELINE = {"classify": "image-classification", "causal-lm": "text-generation"}  # task -> Hub pipeline tag
BUILT_IN = {"digits": "digits (UCI optical recognition of handwritten digits, built into moe-cli)",
            "lm-synthetic": "lm-synthetic (a sparse order-2 Markov token source, built into moe-cli)"}
# recipe sections a card shows (a task's own section is added when the recipe has one)
CARD_SECTIONS = ("model", "data", "task", "optim", "schedule", "train", "moe", "densify", "output")


def hub_config(ckpt: Checkpoint) -> dict:
    """config.json of a pushed checkpoint: moe-cli's keys, and timm's for timm architectures."""
    cfg = {"library_name": LIBRARY, "format": "moe-cli/1", "architecture": ckpt.architecture["name"],
           "task": ckpt.task, "moe": ckpt.moe.to_dict() if ckpt.moe else None}
    if ":" in ckpt.architecture["name"]:  # transformers:ClassName, not a timm architecture
        return cfg
    kwargs = dict(ckpt.architecture.get("kwargs", {}))
    num_classes = getattr(ckpt.model, "num_classes", kwargs.get("num_classes"))
    pretrained_cfg = dict(ckpt.data_config or {})
    if hasattr(ckpt.model, "pretrained_cfg") and "input_size" in ckpt.model.pretrained_cfg:
        pretrained_cfg["input_size"] = list(ckpt.model.pretrained_cfg["input_size"])
    classes = (ckpt.extra.get("data") or {}).get("classes")
    if isinstance(num_classes, int):
        pretrained_cfg["num_classes"] = num_classes
    if classes and len(classes) == num_classes:
        pretrained_cfg["label_names"] = classes
    kwargs.pop("num_classes", None)
    return {**cfg, "num_classes": num_classes, "model_args": kwargs, "pretrained_cfg": pretrained_cfg}


def _dataset(record: dict | None) -> tuple[str, str, str | None]:
    """(dataset type, its name, its Hub id or None) of a checkpoint's data record."""
    if not record:
        return "unknown", "unknown", None
    name, root = record.get("name") or "", record.get("root")
    if name in BUILT_IN:
        return name, BUILT_IN[name], None
    if name.startswith("hfds/"):
        hub = name.split("/", 1)[1]
        return hub, hub, hub
    if name:
        return name.split("/")[-1], name, None
    return "imagefolder", f"an image folder ({str(root).rstrip('/').split('/')[-1]})", None


def _flags(settings: dict) -> str:
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):
            out.append(f"{flag} {','.join(map(str, value))}")
        elif value is not None:
            out.append(f"{flag} {value}")
    return " ".join(out)


def _recipe_yaml(recipe: dict) -> str:
    shown = {k: recipe[k] for k in CARD_SECTIONS if recipe.get(k) is not None}
    section = {"masked-tokens": "masked_tokens", "causal-lm": "causal_lm"}.get(recipe.get("task"), recipe.get("task"))
    if section in recipe:
        shown[section] = recipe[section]
    return yaml.safe_dump(shown, sort_keys=False).rstrip()


def made_with(ckpt: Checkpoint) -> list[str]:
    """Markdown for the chain of steps that made the checkpoint (each `moe upcycle` command, each recipe)."""
    steps = ckpt.extra.get("made_with") or []
    lines: list[str] = []
    for i, step in enumerate(steps):
        nxt = steps[i + 1] if i + 1 < len(steps) else {}
        if "upcycle" in step:
            if ((nxt.get("finetune") or {}).get("model") or {}).get("upcycle"):
                continue  # the next recipe upcycled it (model.upcycle): shown there
            up = step["upcycle"]
            lines += ["```bash", f"moe upcycle {up['source']} {_flags(up['settings'])}".rstrip(), "```", ""]
        elif "finetune" in step:
            lines += ["then trained with `moe finetune recipe.yaml`:" if lines else "`moe finetune recipe.yaml`:", "",
                      "```yaml", _recipe_yaml(step["finetune"]), "```", ""]
        elif "merge" in step or "prune" in step:  # moe merge / moe prune of the checkpoint made so far
            (command, settings), = step.items()
            lines += [f"then `moe {command} CKPT {_flags(settings)}`.", ""]
    if lines or ckpt.moe is None:
        return lines
    m = ckpt.moe  # a checkpoint written before moe-cli recorded its chain: its layout
    cmd = f"moe upcycle {ckpt.source or ckpt.architecture['name']} --experts {m.experts} --k {m.k} --gate {m.gate}"
    cmd += f" --init {m.init}" if m.init != "copy" else ""
    return ["```bash", cmd, "```", ""]


def card_data(ckpt: Checkpoint, title: str, results: dict | None, library: str = LIBRARY,
              base_model: str | None = None) -> ModelCardData:
    """The card's YAML metadata; eval results (the run's final evaluation) become ``model-index``."""
    pipeline = PIPELINE.get(ckpt.task)
    data_type, data_name, data_hub = _dataset(ckpt.extra.get("data"))
    split = (ckpt.extra.get("data") or {}).get("val_split", "validation")
    evals = [EvalResult(task_type=pipeline or ckpt.task, dataset_type=data_type, dataset_name=data_name,
                        dataset_split=split, metric_type=key, metric_value=value)
             for key, value in (results or {}).items()
             if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"]
    tags = ["moe-cli", "mixture-of-experts", "moe", ckpt.task]
    if ":" not in ckpt.architecture["name"] and library == LIBRARY:
        tags.insert(3, "timm")
    base = base_model or ckpt.extra.get("base_model")
    return ModelCardData(library_name=library, pipeline_tag=pipeline, base_model=base, license=ckpt.extra.get(
        "license"), tags=tags, datasets=[data_hub] if data_hub else None, model_name=title,
        eval_results=evals or None)


def model_card(ckpt: Checkpoint, repo_id: str, results: dict | None = None, figure: str | None = None) -> str:
    """README.md of a pushed moe-cli checkpoint: metadata, the layout, how it was made, eval results (on which
    data), the routing figure and how to load it."""
    title = repo_id.split("/")[-1]
    data = card_data(ckpt, title, results)
    m = ckpt.moe
    lines = [f"# {title}", ""]
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
                  f"| expert init | {m.init} |", ""]
    if chain := made_with(ckpt):
        lines += ["## How it was made", "", *chain]
    if results:
        _, data_name, _ = _dataset(ckpt.extra.get("data"))
        lines += [f"## Evaluation (the run's final evaluation, on {data_name})", "", "| metric | value |",
                  "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()
                  if isinstance(v, (int, float)) and k != "step"]
        lines.append("")
    if figure:
        lines += ["## Routing", "", f"![expert load per layer]({figure})", ""]
    kind = "MoE" if ckpt.moe else "dense"
    lines += ["## Use", "", "```bash", "pip install moe-cli", f"moe eval hf-hub:{repo_id}", "```", "", "```python",
              "import moe_cli", "", f"model = moe_cli.load('hf-hub:{repo_id}')  # the {kind} model, in eval mode",
              "```", ""]
    if m is None and "pretrained_cfg" in hub_config(ckpt):
        lines += ["A dense timm model, so timm loads it too:", "", "```python", "import timm", "",
                  f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True)", "```", ""]
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines)))


def native_card(ckpt: Checkpoint, title: str, target: str) -> str:
    """README.md of a `moe export --format transformers` folder: transformers' own metadata, the chain that made
    it, how to load it with transformers alone."""
    data = card_data(ckpt, title, None, library="transformers")
    m = ckpt.moe
    lines = [f"# {title}", "", f"A `{target}` made by [moe-cli](https://pypi.org/project/moe-cli/) from "
             f"`{ckpt.source}`" + (f" ({m.experts} experts, top-{m.k}, {m.init} upcycling)." if m else "."), ""]
    if chain := made_with(ckpt):
        lines += ["## How it was made", "", *chain]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM", "",
              f"model = AutoModelForCausalLM.from_pretrained('{title}')  # no moe-cli, no trust_remote_code",
              "```", ""]
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines)))
