"""Dense FFN layouts: one adapter per way a dense FFN holds its weights, and the one place that maps them to the
expert weights of an :class:`~moe_cli.moe.layer.MoEMlp` and back.

An expert is ``fc2(norm(act(x wg + bg) * (x w1 + b1)))`` (GLU) or ``fc2(norm(act(x w1 + b1)))``; its weights are
named ``w1``, ``b1``, ``wg``, ``bg``, ``norm_w``, ``norm_b``, ``w2``, ``b2``. An adapter says which modules are
its layout (:meth:`FFNLayout.detects` for automatic detection, :meth:`FFNLayout.accepts` for a module named with
``target``), reads one into a :class:`DenseFFN` and writes expert weights back into one. Upcycling, split, drop,
merge, prune, densify and calibration all go through :func:`layout_of`; a new layout is one class here and one
line in :data:`LAYOUTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import nn


def hidden_norm_eps(norm: nn.Module | None) -> float | None:
    """The one rule for an FFN's norm over its hidden units: LayerNorm (its eps) or none (None)."""
    if norm is None or isinstance(norm, nn.Identity):
        return None
    if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine:
        raise ValueError(f"hidden norm {type(norm).__name__} is not supported by MoE experts (LayerNorm or none)")
    return norm.eps


@dataclass
class DenseFFN:
    """What an MoE layer needs of a dense FFN: its shape, activation, dropout and weights (expert names)."""

    in_features: int
    hidden_features: int
    out_features: int
    act: nn.Module
    weights: dict[str, torch.Tensor]  # w1, b1, wg, bg, norm_w, norm_b, w2, b2 (those it has), detached
    norm_eps: float | None = None
    drop: tuple[float, float] = (0.0, 0.0)
    channels_first: bool = False  # 1x1 convolutions over (B, C, H, W)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def glu(self) -> bool:
        return "wg" in self.weights

    @property
    def bias(self) -> tuple[bool, bool]:
        return "b1" in self.weights, "b2" in self.weights


def _weight(layer: nn.Module) -> torch.Tensor:
    w = layer.weight
    return w.flatten(1) if w.dim() == 4 else w  # 1x1 conv -> linear


def _put(layer: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> None:
    layer.weight.data.copy_(w.view_as(layer.weight))
    if b is not None:
        layer.bias.data.copy_(b)


def _kept(d: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in d.items() if v is not None}


class FFNLayout:
    """How one kind of dense FFN holds its weights."""

    name = ""
    types: tuple[type, ...] = ()  # module classes detected automatically
    attrs: tuple[str, ...] = ()  # what a module named with `target` must have

    def detects(self, module: nn.Module) -> bool:
        """Found without being named (automatic FFN detection)."""
        return type(module) in self.types

    def accepts(self, module: nn.Module) -> bool:
        """Usable when the user names the module (``target``)."""
        return self.detects(module) or all(hasattr(module, a) for a in self.attrs)

    def read(self, module: nn.Module) -> DenseFFN:
        raise NotImplementedError

    def write(self, module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Put one expert's weights (expert names) into the dense ``module``: the inverse of :meth:`read`."""
        raise NotImplementedError


class FcLayout(FFNLayout):
    """timm ``Mlp`` (fc1, act, optional hidden norm, fc2; 1x1 convolutions for channels-first models)."""

    name = "timm Mlp"
    types = (Mlp,)
    attrs = ("fc1", "act", "fc2")
    act = "act"  # the activation module's attribute

    def _fc1(self, module: nn.Module) -> dict:
        return {"w1": _weight(module.fc1), "b1": module.fc1.bias}

    def read(self, module: nn.Module) -> DenseFFN:
        norm = getattr(module, "norm", None)
        eps = hidden_norm_eps(norm)
        w = {**self._fc1(module), "w2": _weight(module.fc2), "b2": module.fc2.bias}
        if eps is not None:
            w.update(norm_w=norm.weight, norm_b=norm.bias)
        drop1, drop2 = getattr(module, "drop1", None), getattr(module, "drop2", None)
        return DenseFFN(w["w1"].shape[1], w["w1"].shape[0], w["w2"].shape[0], getattr(module, self.act), _kept(w), eps,
                        (getattr(drop1, "p", 0.0), getattr(drop2, "p", 0.0)), isinstance(module.fc2, nn.Conv2d),
                        w["w1"].device)

    def _write_fc1(self, module: nn.Module, weights: dict) -> None:
        _put(module.fc1, weights["w1"], weights.get("b1"))

    def write(self, module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        self._write_fc1(module, weights)
        if "norm_w" in weights:
            module.norm.weight.data.copy_(weights["norm_w"])
            module.norm.bias.data.copy_(weights["norm_b"])
        _put(module.fc2, weights["w2"], weights.get("b2"))


class GluLayout(FcLayout):
    """timm ``GluMlp``: fc1's output chunked in two halves, one of them the gate (``gate_last``)."""

    name = "timm GluMlp"
    types = (GluMlp,)
    attrs = ("fc1", "act", "fc2", "gate_last")

    def _fc1(self, module: nn.Module) -> dict:
        w, b = _weight(module.fc1), module.fc1.bias
        (wa, wb), (ba, bb) = w.chunk(2, 0), (b.chunk(2, 0) if b is not None else (None, None))
        return {"w1": wa, "b1": ba, "wg": wb, "bg": bb} if module.gate_last else \
            {"w1": wb, "b1": bb, "wg": wa, "bg": ba}

    def _write_fc1(self, module: nn.Module, weights: dict) -> None:
        first, second = ("w1", "wg") if module.gate_last else ("wg", "w1")
        bias = "b1" in weights
        _put(module.fc1, torch.cat([weights[first], weights[second]]),
             torch.cat([weights["b" + first[1:]], weights["b" + second[1:]]]) if bias else None)


class SwiGLULayout(FcLayout):
    """timm ``SwiGLU``: act(fc1_g x) * fc1_x x, then norm and fc2."""

    name = "timm SwiGLU"
    types = (SwiGLU,)
    attrs = ("fc1_g", "fc1_x", "act", "fc2")

    def _fc1(self, module: nn.Module) -> dict:
        return {"w1": _weight(module.fc1_x), "b1": module.fc1_x.bias, "wg": _weight(module.fc1_g),
                "bg": module.fc1_g.bias}

    def _write_fc1(self, module: nn.Module, weights: dict) -> None:
        _put(module.fc1_x, weights["w1"], weights.get("b1"))
        _put(module.fc1_g, weights["wg"], weights.get("bg"))


class FcActivationLayout(FcLayout):
    """The MLP of transformers vision models (``ViTMLP``, ``DeiTMLP``, ``Dinov2MLP``, ``CLIPMLP``, ``SiglipMLP``):
    fc2(activation_fn(fc1 x)). Detected by its parts, whatever the class is called."""

    name = "fc1/activation_fn/fc2 MLP"
    attrs = ("fc1", "activation_fn", "fc2")
    act = "activation_fn"

    def detects(self, module: nn.Module) -> bool:
        return all(isinstance(getattr(module, a, None), nn.Linear) for a in ("fc1", "fc2")) and \
            isinstance(getattr(module, "activation_fn", None), nn.Module)


class GateUpDownLayout(FFNLayout):
    """The gate/up/down MLP of Llama, Mistral, Qwen2, Qwen3 (transformers ``LlamaMLP`` and its kin):
    down_proj(act_fn(gate_proj x) * up_proj x). Detected by its parts, whatever the class is called."""

    name = "gate/up/down MLP"
    attrs = ("gate_proj", "up_proj", "down_proj", "act_fn")

    def detects(self, module: nn.Module) -> bool:
        return all(isinstance(getattr(module, a, None), nn.Linear) for a in self.attrs[:3]) and \
            isinstance(getattr(module, "act_fn", None), nn.Module)

    def read(self, module: nn.Module) -> DenseFFN:
        up, gate, down = module.up_proj, module.gate_proj, module.down_proj
        w = {"w1": up.weight, "b1": up.bias, "wg": gate.weight, "bg": gate.bias, "w2": down.weight, "b2": down.bias}
        return DenseFFN(up.in_features, up.out_features, down.out_features, module.act_fn, _kept(w),
                        device=up.weight.device)

    def write(self, module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        _put(module.up_proj, weights["w1"], weights.get("b1"))
        _put(module.gate_proj, weights["wg"], weights.get("bg"))
        _put(module.down_proj, weights["w2"], weights.get("b2"))


class Conv1DLayout(FFNLayout):
    """GPT-2's MLP (transformers ``GPT2MLP``): dropout(c_proj(act(c_fc x))), where c_fc and c_proj are
    transformers ``Conv1D`` layers holding their weights transposed (in, out). Detected by its parts."""

    name = "GPT-2 MLP"
    attrs = ("c_fc", "c_proj", "act")

    def detects(self, module: nn.Module) -> bool:
        return all(type(getattr(module, a, None)).__name__ == "Conv1D" for a in ("c_fc", "c_proj")) and \
            isinstance(getattr(module, "act", None), nn.Module)

    def read(self, module: nn.Module) -> DenseFFN:
        fc, proj = module.c_fc, module.c_proj
        w = {"w1": fc.weight.T, "b1": fc.bias, "w2": proj.weight.T, "b2": proj.bias}
        drop = getattr(getattr(module, "dropout", None), "p", 0.0)
        return DenseFFN(fc.weight.shape[0], fc.weight.shape[1], proj.weight.shape[1], module.act, _kept(w),
                        drop=(0.0, drop), device=fc.weight.device)

    def write(self, module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        for layer, w, b in ((module.c_fc, "w1", "b1"), (module.c_proj, "w2", "b2")):
            layer.weight.data.copy_(weights[w].T)
            if b in weights:
                layer.bias.data.copy_(weights[b])


# most specific first: a module named with `target` takes the first layout that accepts it
LAYOUTS: tuple[FFNLayout, ...] = (
    SwiGLULayout(),
    GluLayout(),
    GateUpDownLayout(),
    Conv1DLayout(),
    FcActivationLayout(),
    FcLayout(),
)


def layout_of(module: nn.Module, named: bool = True) -> FFNLayout | None:
    """The layout of ``module``: one that detects it, else (``named``: the user named it) one that accepts it."""
    return next((lay for lay in LAYOUTS if lay.detects(module)), None) or \
        (next((lay for lay in LAYOUTS if lay.accepts(module)), None) if named else None)


def known_layouts() -> str:
    return ", ".join(lay.name for lay in LAYOUTS)


def read_ffn(module: nn.Module) -> DenseFFN:
    """The dense FFN ``module`` in expert terms (ValueError naming the layouts if it is none of them)."""
    layout = layout_of(module)
    if layout is None:
        raise ValueError(f"{type(module).__name__} is not an FFN of a known layout ({known_layouts()})")
    return layout.read(module)


def write_ffn(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put one expert's weights into the dense FFN ``module`` (the inverse of :func:`read_ffn`)."""
    layout = layout_of(module)
    if layout is None:
        raise ValueError(f"{type(module).__name__} is not an FFN of a known layout ({known_layouts()})")
    layout.write(module, weights)


def token_view(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """How to see the input of the dense FFN ``module`` as (tokens, features): channels-first FFNs move C last."""
    return (lambda x: x.movedim(1, -1)) if read_ffn(module).channels_first else (lambda x: x)
