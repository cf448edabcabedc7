"""Tasks: each owns how the recipe's model is prepared (head / wrapper), its loss and its metrics.

- `classify`: cross-entropy; top-1/top-5 accuracy and CE. Starts from an MAE checkpoint's encoder when given one.
- `mae`: masked-autoencoder pretraining of a timm ViT (moe_cli.models.mae); masked-patch loss, pixel MSE, LPIPS.
- `masked-tokens`: MaskGIT-style masked-token modelling over video tokens (moe_cli.models.video); cosine mask
  schedule, CE / accuracy on masked tokens, LPIPS of decoded frames through a user decoder (module:function).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from moe_cli.data.tokens import load_decoder
from moe_cli.errors import ConfigError
from moe_cli.evaluate.lpips import lpips_distance
from moe_cli.io.checkpoint import Checkpoint
from moe_cli.models.mae import EVAL_MASK_SEED, MaskedAutoencoder, mae_kwargs
from moe_cli.models.surgery import moe_layers
from moe_cli.train.recipe import TASKS, MAECfg, MaskedTokensCfg, Recipe

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[precision])


def aux_loss(model: nn.Module, load_balance: float, z_loss: float) -> tuple[torch.Tensor | None, dict]:
    """Weighted MoE aux losses of the last forward, averaged over MoE layers."""
    layers = [m for _, m in moe_layers(model) if m.aux_losses]
    if not layers:
        return None, {}
    lb = torch.stack([m.aux_losses["load_balance"] for m in layers]).mean()
    z = torch.stack([m.aux_losses["z_loss"] for m in layers]).mean()
    dropped = torch.stack([m.last_dropped for m in layers]).mean()
    return load_balance * lb + z_loss * z, {"load_balance": lb.item(), "z_loss": z.item(),
                                            "dropped": dropped.item()}


def expert_imbalance(model: nn.Module) -> float | None:
    """Mean over MoE layers of max/mean tokens per expert in the last forward (1.0 = perfectly balanced)."""
    ratios = []
    for _, m in moe_layers(model):
        if m.last_counts is not None and m.last_counts.sum() > 0:
            c = m.last_counts.float()
            ratios.append((c.max() / c.mean()).item())
    return sum(ratios) / len(ratios) if ratios else None


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Task:
    """What the loop and `moe eval` need of an objective."""

    name = ""
    quality: frozenset[str] = frozenset()  # the `moe eval` quality metrics (accuracy, ce, mse, lpips) it reports
    produces = ""  # what the model outputs, for the note when a metric does not apply
    default_metrics = ""  # `moe eval` without --metric

    def prepare(self, ckpt: Checkpoint, recipe: Recipe) -> Checkpoint:
        """Turn the recipe's loaded source into the model this task trains (wrap it, swap its head, check it)."""
        return ckpt

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                 lpips: nn.Module | None = None) -> dict:
        raise NotImplementedError


def _is_token_model(model: nn.Module) -> bool:
    return hasattr(model, "token_shape")


class ClassifyTask(Task):
    name = "classify"
    quality = frozenset({"accuracy", "ce"})
    produces = "class scores"
    default_metrics = "accuracy,ce,routing,flops"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def prepare(self, ckpt: Checkpoint, recipe: Recipe) -> Checkpoint:
        if _is_token_model(ckpt.model):
            raise ConfigError(f"{recipe.model.source} is a token model; train it with `task: masked-tokens`")
        if isinstance(ckpt.model, MaskedAutoencoder):
            num_classes = recipe.model.kwargs.get("num_classes")
            if not isinstance(num_classes, int) or num_classes < 1:
                raise ConfigError(f"{recipe.model.source} is an MAE; set `model.kwargs.num_classes` to give its "
                                  "encoder a classifier head")
            return mae_encoder(ckpt, num_classes)
        return ckpt

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return loss, {"ce": loss.item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                 lpips: nn.Module | None = None) -> dict:
        was_training = model.training
        model.eval()
        n, correct1, correct5, ce_sum = 0, 0, 0, 0.0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x).float()
            ce_sum += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(-1).sum().item()
            n += len(y)
        model.train(was_training)
        if n == 0:
            return {"accuracy": math.nan, "top5": math.nan, "ce": math.nan}
        return {"accuracy": correct1 / n, "top5": correct5 / n, "ce": ce_sum / n}


def mae_encoder(ckpt: Checkpoint, num_classes: int) -> Checkpoint:
    """The encoder of an MAE checkpoint as a timm classifier with a fresh ``num_classes`` head (MoE layers kept)."""
    kw = ckpt.architecture["kwargs"]
    encoder = ckpt.model.encoder
    encoder.reset_classifier(num_classes)
    arch = {"name": kw["encoder"], "kwargs": {**kw["encoder_kwargs"], "num_classes": num_classes}}
    moe = None
    if ckpt.moe is not None:
        moe = dataclasses.replace(ckpt.moe, layers=tuple(n.removeprefix("encoder.") for n in ckpt.moe.layers))
    return Checkpoint(encoder, arch, moe, ckpt.source, "classify", dict(ckpt.extra))


class MAETask(Task):
    name = "mae"
    quality = frozenset({"mse", "lpips"})
    produces = "reconstructed images"
    default_metrics = "mse,routing,flops"

    def __init__(self, cfg: MAECfg | None = None):
        self.cfg = dataclasses.asdict(cfg or MAECfg())

    def prepare(self, ckpt: Checkpoint, recipe: Recipe) -> Checkpoint:
        """Wrap the source ViT (dense or MoE) in an MAE, or continue an MAE checkpoint with the recipe's masking."""
        model = ckpt.model
        if isinstance(model, MaskedAutoencoder):
            model.mask_ratio, model.norm_pix_loss = self.cfg["mask_ratio"], self.cfg["norm_pix_loss"]
            kw = {**ckpt.architecture["kwargs"], "mask_ratio": model.mask_ratio, "norm_pix_loss": model.norm_pix_loss}
            ckpt.architecture = {**ckpt.architecture, "kwargs": kw}
            return ckpt
        try:
            mae = MaskedAutoencoder(model, **self.cfg)
        except ValueError as e:
            raise ConfigError(f"task mae with model {recipe.model.source}: {e}") from None
        ckpt.model = mae
        ckpt.architecture = {"name": "mae_vit", "kwargs": mae_kwargs(ckpt.architecture["name"],
                                                                     ckpt.architecture.get("kwargs", {}), **self.cfg)}
        if ckpt.moe is not None:
            ckpt.moe = dataclasses.replace(ckpt.moe, layers=tuple(f"encoder.{n}" for n in ckpt.moe.layers))
        return ckpt

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        images = batch[0]
        mae = _unwrap(model)
        mask = mae.random_mask(images.shape[0], images.device)
        loss = mae.loss(images, model(images, mask), mask)
        return loss, {"mae": loss.item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                 lpips: nn.Module | None = None) -> dict:
        """Masked-patch loss, pixel MSE on the masked patches and (with ``lpips``) LPIPS of the reconstructions
        (visible patches kept, masked ones predicted) against the originals; masks from a fixed seed."""
        mae = _unwrap(model)
        was_training = mae.training
        mae.eval()
        gen = torch.Generator().manual_seed(EVAL_MASK_SEED)
        n, loss_sum, se_sum, masked, lp_sum = 0, 0.0, 0.0, 0, 0.0
        for batch in loader:
            images = batch[0].to(device, non_blocking=True)
            mask = mae.random_mask(images.shape[0], device, gen)
            with autocast(device, precision):
                pred = mae(images, mask)
            loss_sum += mae.loss(images, pred, mask).item() * len(images)
            recon = mae.reconstruct(images, pred, mask)
            err = (mae.patchify(recon) - mae.patchify(images.float())).pow(2).mean(-1)
            se_sum += (err * mask).sum().item()
            masked += int(mask.sum())
            if lpips is not None:
                lp_sum += lpips_distance(recon, images, lpips).sum().item()
            n += len(images)
        mae.train(was_training)
        out = {"loss": loss_sum / max(n, 1), "mse": se_sum / max(masked, 1)}
        if lpips is not None:
            out["lpips"] = lp_sum / max(n, 1)
        return out


def token_mask(batch: int, n: int, device: torch.device, generator: torch.Generator | None = None,
               ratio: float | None = None) -> torch.Tensor:
    """(batch, n) bool, True = masked. MaskGIT's cosine schedule: ratio = cos(pi/2 * r), r ~ U(0, 1), per
    sequence (or the fixed ``ratio``); ceil(ratio * n) tokens masked, at least one."""
    where = "cpu" if generator is not None else device
    if ratio is None:
        ratio_t = torch.cos(math.pi / 2 * torch.rand(batch, generator=generator, device=where))
    else:
        ratio_t = torch.full((batch,), float(ratio), device=where)
    n_mask = (ratio_t * n).ceil().clamp(1, n)
    scores = torch.rand(batch, n, generator=generator, device=where)
    return (scores.argsort(-1).argsort(-1) < n_mask[:, None]).to(device)


@torch.no_grad()
def fill_masked(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, steps: int = 8,
                precision: str = "fp32") -> torch.Tensor:
    """MaskGIT iterative decoding: start with the masked positions as [MASK]; at each of ``steps`` steps predict
    all of them and keep the most confident, so that cos(pi/2 * s/steps) of them stay masked after step s."""
    net = _unwrap(model)
    b = tokens.shape[0]
    flat_mask = mask.reshape(b, -1)
    cur = tokens.masked_fill(mask, net.mask_id).reshape(b, -1)
    remaining = flat_mask.clone()
    total = flat_mask.sum(-1)
    for s in range(steps):
        with autocast(tokens.device, precision):
            logits = model(cur.view_as(tokens))
        conf, pred = logits.float().reshape(b, cur.shape[1], -1).softmax(-1).max(-1)
        keep_masked = (total * math.cos(math.pi / 2 * (s + 1) / steps)).floor().long()
        n_reveal = (remaining.sum(-1) - keep_masked).clamp(min=1)
        conf = conf.masked_fill(~remaining, -1.0)
        rank = conf.argsort(-1, descending=True).argsort(-1)
        reveal = remaining & (rank < n_reveal[:, None])
        cur = torch.where(reveal, pred, cur)
        remaining &= ~reveal
    return cur.view_as(tokens)


class MaskedTokensTask(Task):
    name = "masked-tokens"
    quality = frozenset({"ce", "accuracy", "lpips"})
    produces = "token predictions"
    default_metrics = "ce,accuracy,routing,flops"

    def __init__(self, cfg: MaskedTokensCfg | None = None, label_smoothing: float = 0.0):
        self.cfg = cfg or MaskedTokensCfg()
        self.label_smoothing = label_smoothing

    def prepare(self, ckpt: Checkpoint, recipe: Recipe) -> Checkpoint:
        if not _is_token_model(ckpt.model):
            raise ConfigError(f"task masked-tokens needs a token model such as maskgit_video; "
                              f"{recipe.model.source} is a {type(ckpt.model).__name__}")
        frames = ckpt.model.token_shape[0]
        if self.cfg.predict_frames >= frames:
            raise ConfigError(f"`masked_tokens.predict_frames` ({self.cfg.predict_frames}) must be smaller than the "
                              f"model's frames ({frames})")
        ckpt.task_config = {**dataclasses.asdict(self.cfg), "data_root": recipe.data.root,
                            "val_split": recipe.data.val_split}
        return ckpt

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        tokens = batch[0]
        net = _unwrap(model)
        mask = token_mask(tokens.shape[0], tokens[0].numel(), tokens.device).view_as(tokens)
        logits = model(tokens.masked_fill(mask, net.mask_id))
        loss = F.cross_entropy(logits.float()[mask], tokens[mask], label_smoothing=self.label_smoothing)
        return loss, {"ce": loss.item()}

    def eval_mask(self, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.cfg.predict_frames:
            mask = torch.zeros_like(tokens, dtype=torch.bool)
            mask[:, -self.cfg.predict_frames:] = True
            return mask
        return token_mask(tokens.shape[0], tokens[0].numel(), tokens.device, generator,
                          self.cfg.eval_mask_ratio).view_as(tokens)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                 lpips: nn.Module | None = None) -> dict:
        """CE and accuracy on held-out masked tokens (masks from a fixed seed, or the last frames); with ``lpips``
        and a decoder, LPIPS between decoded frames holding masked tokens (filled by iterative decoding) and the
        decoded ground truth."""
        decoder = load_decoder(self.cfg.decoder) if lpips is not None and self.cfg.decoder else None
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(0)
        ce_sum, correct, count, lp_sum, frames = 0.0, 0, 0, 0.0, 0
        for batch in loader:
            tokens = batch[0].to(device, non_blocking=True)
            mask = self.eval_mask(tokens, gen)
            with autocast(device, precision):
                logits = model(tokens.masked_fill(mask, _unwrap(model).mask_id)).float()
            ce_sum += F.cross_entropy(logits[mask], tokens[mask], reduction="sum").item()
            correct += (logits[mask].argmax(-1) == tokens[mask]).sum().item()
            count += int(mask.sum())
            if decoder is not None:
                filled = fill_masked(model, tokens, mask, self.cfg.sample_steps, precision)
                pred_img, true_img = decoded_frames(decoder, filled, device), decoded_frames(decoder, tokens, device)
                keep = mask.flatten(2).any(-1).flatten()  # frames that held masked tokens
                lp_sum += lpips_distance(pred_img[keep], true_img[keep], lpips).sum().item()
                frames += int(keep.sum())
        model.train(was_training)
        out = {"ce": ce_sum / max(count, 1), "accuracy": correct / max(count, 1)}
        if decoder is not None:
            out["lpips"] = lp_sum / max(frames, 1)
        return out


def decoded_frames(decoder, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Run the user decoder and check its output: (B, F, C, h, w) in [-1, 1] -> (B*F, C, h, w)."""
    images = decoder(tokens)
    b, f = tokens.shape[:2]
    if not isinstance(images, torch.Tensor) or images.dim() != 5 or tuple(images.shape[:2]) != (b, f):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"the token decoder must return images (batch, frames, C, H, W) = ({b}, {f}, C, H, W), "
                          f"got {shape}")
    return images.to(device).float().flatten(0, 1)


TASK_TYPES: dict[str, type[Task]] = {t.name: t for t in (ClassifyTask, MAETask, MaskedTokensTask)}


def _section(cls, config: dict):
    """The config dataclass ``cls`` from a dict that may hold other keys (a checkpoint's task_config)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})


def make_task(name: str, config: dict | None = None, label_smoothing: float = 0.0) -> Task:
    """The task called ``name``; ``config`` is its recipe section (`mae` / `masked_tokens`) or a checkpoint's
    stored task_config."""
    config = config or {}
    if name == "classify":
        return ClassifyTask(label_smoothing)
    if name == "mae":
        return MAETask(_section(MAECfg, config))
    if name == "masked-tokens":
        return MaskedTokensTask(_section(MaskedTokensCfg, config), label_smoothing)
    raise ConfigError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


def recipe_task(recipe: Recipe) -> Task:
    section = {"mae": recipe.mae, "masked-tokens": recipe.masked_tokens}.get(recipe.task)
    return make_task(recipe.task, dataclasses.asdict(section) if section else None, recipe.train.label_smoothing)
