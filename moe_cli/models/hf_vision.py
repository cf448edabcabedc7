"""Hugging Face transformers vision models as moe-cli image classifiers: ViT, DeiT, DINOv2, CLIP and SigLIP vision
towers, each built by its own transformers ``*ForImageClassification`` class and upcycled in place (its
``fc1 / activation_fn / fc2`` MLPs become :class:`~moe_cli.moe.layer.MoEMlp`; attention, norms, layer scales and
embeddings untouched), wrapped so that ``model(images)`` returns the logits tensor.

A backbone without a classifier (``ViTModel``, ``Dinov2Model``, a CLIP or SigLIP model or its vision tower) gets
transformers' own fresh classifier (drawn from a fixed seed) with ``num_classes`` outputs; its text tower, if any,
is not read. The repository's ``preprocessor_config.json`` (or, without one, the defaults of the family's image
processor class) becomes the checkpoint's data config: mean, std, resize filter, crop fraction and mode.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_cli.config import check_preprocessing
from moe_cli.errors import ModelSourceError
from moe_cli.models.hf import PREFIX, build_class, config_dict, load_pretrained, transformers_module

# model_type -> the classifier class moe-cli builds for it
VISION = {
    "vit": "ViTForImageClassification",
    "deit": "DeiTForImageClassification",
    "dinov2": "Dinov2ForImageClassification",
    "clip": "CLIPForImageClassification",
    "siglip": "SiglipForImageClassification",
}
# a vision tower saved alone -> (its family, its own class, the family's config class that wraps it)
TOWERS = {"clip_vision_model": ("clip", "CLIPVisionModel", "CLIPConfig"),
          "siglip_vision_model": ("siglip", "SiglipVisionModel", "SiglipConfig")}
PROCESSORS = {"vit": "ViTImageProcessor", "deit": "DeiTImageProcessor", "dinov2": "BitImageProcessor",
              "clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}
DYNAMIC_SIZE = {"dinov2"}  # interpolates its position embeddings to any image size; the others take image_size
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's numbering
HEAD = "classifier."
# the image size a dynamic-size model was given by its processor, kept in its config (so in the checkpoint)
INPUT_SIZE = "moe_cli_input_size"


def family(model_type: str | None) -> str | None:
    """The family (a key of :data:`VISION`) a vision ``model_type`` belongs to, or None."""
    return TOWERS[model_type][0] if model_type in TOWERS else model_type if model_type in VISION else None


def _vision_config(config) -> object:
    return getattr(config, "vision_config", None) or config


class ImageClassifier(nn.Module):
    """A transformers image classifier as moe-cli runs it: images (B, 3, H, W) -> logits (B, classes).
    ``pretrained_cfg`` holds what timm's data config reads (input size, mean, std, interpolation, crop)."""

    def __init__(self, hf: nn.Module, data_config: dict | None = None):
        super().__init__()
        self.hf = hf
        size = getattr(hf.config, INPUT_SIZE, None) or _vision_config(hf.config).image_size
        size = (size, size) if isinstance(size, int) else tuple(size[-2:])
        self.pretrained_cfg = {"input_size": (3, *size), **(data_config or {})}
        # only the encoder's blocks are upcycled (not a SigLIP pooling head's MLP)
        depth = _vision_config(hf.config).num_hidden_layers
        self.moe_scope = "hf." + next(n for n, m in hf.named_modules() if isinstance(m, nn.ModuleList)
                                      and len(m) == depth) + "."

    @property
    def family(self) -> str:
        return family(self.hf.config.model_type)

    @property
    def num_classes(self) -> int:
        return self.hf.config.num_labels

    @property
    def fixed_img_size(self) -> bool:
        """Only images of the configured size (ViT, DeiT, CLIP and SigLIP patch embeddings check it)."""
        return self.family not in DYNAMIC_SIZE

    @property
    def class_name(self) -> str:
        return type(self.hf).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


def data_config(processor: dict, where: str) -> dict:
    """A transformers image processor's settings (``preprocessor_config.json``) as timm data-config fields: resize to
    ``size`` (the shortest edge keeps the aspect: center crop; height and width: squash), ``crop_size`` as the crop
    fraction, ``resample`` as the filter, ``image_mean`` / ``image_std``. Also ``input_size`` (C, H, W)."""
    def hw(value, key):
        if isinstance(value, int):
            return value, value
        if isinstance(value, dict) and isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
            return value["height"], value["width"]
        if isinstance(value, dict) and isinstance(value.get("shortest_edge"), int):
            return value["shortest_edge"], value["shortest_edge"]
        raise ModelSourceError(f"{where}: `{key}` must be a size in pixels ({{height, width}} or {{shortest_edge}}), "
                               f"got {value!r}")

    size = processor.get("size", 224)
    resized = hw(size, "size")
    keeps_aspect = isinstance(size, int) or "shortest_edge" in size
    cropped = bool(processor.get("do_center_crop")) and processor.get("crop_size") is not None
    out = hw(processor["crop_size"], "crop_size") if cropped else resized
    cfg = {"input_size": [3, *out], "crop_pct": out[0] / resized[0] if cropped else 1.0,
           "crop_mode": "center" if cropped or keeps_aspect else "squash",
           "interpolation": RESAMPLE.get(int(processor.get("resample", 3)), "bicubic")}
    if processor.get("do_normalize", True):
        cfg |= {"mean": list(processor.get("image_mean", (0.5,) * 3)),
                "std": list(processor.get("image_std", (0.5,) * 3))}
    else:
        cfg |= {"mean": [0.0] * 3, "std": [1.0] * 3}
    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "resample", "crop_pct": "crop_size"}
    return check_preprocessing(cfg, lambda key: f"{where}: `{keys.get(key, key)}`")


def default_processor(model_type: str) -> dict:
    """The settings of the family's image processor class when the repository has no preprocessor_config.json."""
    return getattr(transformers_module(), PROCESSORS[family(model_type)])().to_dict()


def architecture(model: ImageClassifier) -> dict:
    """The checkpoint metadata that rebuilds ``model`` (its class and config)."""
    return {"name": PREFIX + model.class_name, "kwargs": config_dict(model.hf)}


def build(name: str, config: dict) -> ImageClassifier:
    """A listed transformers image classifier from checkpoint metadata, without weights."""
    return ImageClassifier(build_class(name.removeprefix(PREFIX), config))


def from_pretrained(where: str, config: dict, pretrained: bool = True, num_classes: int | None = None,
                    processor: dict | None = None) -> ImageClassifier:
    """The vision model of a transformers folder or Hub repository as an image classifier in fp32, its classifier
    kept, or drawn fresh (seed 0) when the repository has none or ``num_classes`` differs; ``pretrained`` False:
    the architecture with fresh weights. ``processor``: the repository's preprocessor_config.json, if any."""
    model_type = config["model_type"]
    fam = family(model_type)
    labels = {"num_labels": num_classes} if num_classes is not None else {}
    dc = data_config(processor if processor is not None else default_processor(model_type),
                     f"{where}/preprocessor_config.json")
    tf = transformers_module()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a fresh classifier is the same on every run
        if model_type in TOWERS:  # the tower alone: the family's classifier around it
            _, tower_class, config_class = TOWERS[model_type]
            wrapper = getattr(tf, config_class)(vision_config=config, **labels).to_dict()
            clf = build_class(VISION[fam], wrapper)
            if pretrained:
                clf.vision_model = load_pretrained(getattr(tf, tower_class), where)
        elif pretrained:
            clf = load_pretrained(getattr(tf, VISION[fam]), where, fresh=HEAD, **labels)
        else:
            clf = build_class(VISION[fam], {**config, **labels})
    size = dc.pop("input_size")
    if fam in DYNAMIC_SIZE:
        setattr(clf.config, INPUT_SIZE, size[1:])
    return ImageClassifier(clf.eval(), dc)
