"""What every Hugging Face transformers model moe-cli reads shares: the optional package, the ``transformers:``
class names checkpoints record, and the config keys never passed on from metadata.

The optional `transformers` package (``pip install -e '.[hf]'``) is imported only through
:func:`transformers_module` and only when such a model is used: timm work never needs it. Only the classes moe-cli
lists are built from a checkpoint's config, never code a repository names (no ``trust_remote_code``).
"""

from __future__ import annotations

from torch import nn

from moe_cli.errors import ModelSourceError

HF_EXTRA = "pip install -e '.[hf]' (in the moe-cli checkout), or pip install transformers tokenizers"
PREFIX = "transformers:"
# config keys that say where code or files come from, not what the model is: never passed on from metadata
NOT_ARCHITECTURE = ("auto_map", "architectures", "transformers_version", "name_or_path")


def transformers_module():
    """The `transformers` package, or one line saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ModelSourceError(f"Hugging Face transformers models need the optional `transformers` package: "
                               f"{HF_EXTRA}") from None
    transformers.utils.logging.set_verbosity_error()  # its load reports and progress bars are not ours to print
    transformers.utils.logging.disable_progress_bar()
    return transformers


def is_transformers_config(config) -> bool:
    """A transformers ``config.json`` (it names its ``model_type``)."""
    return isinstance(config, dict) and isinstance(config.get("model_type"), str) and "architecture" not in config


def architecture_config(config: dict) -> dict:
    """``config`` without the keys that point at code or files (in sub-configs too: CLIP's vision_config)."""
    return {k: architecture_config(v) if isinstance(v, dict) and "model_type" in v else v
            for k, v in config.items() if not k.startswith("_") and k not in NOT_ARCHITECTURE}


def config_dict(module: nn.Module) -> dict:
    """A transformers model's config as plain JSON, without the keys that point at code or files."""
    return architecture_config(module.config.to_dict())


def build_class(class_name: str, config: dict) -> nn.Module:
    """The transformers class ``class_name`` built from ``config`` (fresh weights, eval mode)."""
    cls = getattr(transformers_module(), class_name)
    try:
        return cls(cls.config_class.from_dict(architecture_config(config))).eval()
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ModelSourceError(f"cannot build {class_name} from its config: {str(e).splitlines()[0]}") from None


def load_pretrained(cls, where, fresh: str | None = None, **kwargs) -> nn.Module:
    """``cls.from_pretrained(where)`` in fp32, eval mode. Every weight must come from the repository, with its
    shape, except those under the prefix ``fresh`` (a classifier drawn anew); else one line naming the first
    missing or mismatched key (transformers' loading report), as for any failure to load."""
    import torch

    try:
        model, info = cls.from_pretrained(str(where), dtype=torch.float32, output_loading_info=True,
                                          ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ModelSourceError(f"cannot load the transformers model in {where}: {str(e).splitlines()[0]}") from None
    def kept(key):
        return fresh is None or not key.startswith(fresh)

    missing = [k for k in info.get("missing_keys", ()) if kept(k)]
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
    mismatched = [k for k in mismatched if kept(k)]
    if missing or mismatched:
        key = sorted(missing or mismatched)[0]
        raise ModelSourceError(f"the weights in {where} do not match its config.json: `{key}` is "
                               f"{'missing' if missing else 'of another shape'} ({len(missing)} missing, "
                               f"{len(mismatched)} of another shape)")
    return model.eval()
