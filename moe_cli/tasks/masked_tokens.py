"""`masked-tokens`: MaskGIT-style masked-token modelling over video tokens (moe_cli.models.video); cosine mask
schedule, CE / accuracy on masked tokens, LPIPS of decoded frames through a user decoder (module:function)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_cli.checks import Checked, Label, check
from moe_cli.config import DataCfg, ModelCfg
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint
from moe_cli.models.decoders import decoded_frames, load_decoder
from moe_cli.models.genie import Genie
from moe_cli.models.lpips import lpips_distance
from moe_cli.runtime import autocast
from moe_cli.tasks.base import TaskData, TokenTask, evaluation, unwrap


@dataclass(frozen=True)
class MaskedTokensCfg(Checked):
    """MaskGIT-style training: cosine mask schedule, cross-entropy on the masked tokens (section `masked_tokens`)."""

    eval_mask_ratio: float | None = None  # eval masks: None = cosine-schedule ratios from a fixed seed
    predict_frames: int = 0  # eval: mask the last N frames entirely (future-frame prediction) instead
    decoder: str | None = None  # module:function, tokens (B,F,H,W) -> images (B,F,C,h,w) in [-1, 1], for LPIPS
    sample_steps: int = 8  # iterative decoding steps when filling masked tokens for LPIPS

    def validate(self, label: Label) -> MaskedTokensCfg:
        check(self.eval_mask_ratio is None or 0 < self.eval_mask_ratio <= 1, label("eval_mask_ratio"),
              "a number in (0, 1] or null", self.eval_mask_ratio)
        check(self.predict_frames >= 0, label("predict_frames"), "an integer >= 0", self.predict_frames)
        check(self.sample_steps >= 1, label("sample_steps"), "an integer >= 1", self.sample_steps)
        return self


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
    net = unwrap(model)
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


class MaskedTokensTask(TokenTask):
    name = "masked-tokens"
    Config, section = MaskedTokensCfg, "masked_tokens"
    data = TaskData(("tokens",), "token data (`data.name: tokens`)", "a folder with validation.json")
    metrics = TokenTask.figures("masked-token accuracy", "masked-token cross-entropy",
                                "LPIPS (AlexNet, decoded frames)")

    def prepare(self, ckpt: Checkpoint, model: ModelCfg, data: DataCfg) -> Checkpoint:
        if isinstance(ckpt.model, Genie):
            raise ConfigError(f"{model.source} is a GENIE model: train it with `task: genie` and `data.name: genie`")
        ckpt = super().prepare(ckpt, model, data)
        frames = ckpt.model.token_shape[0]
        if self.cfg.predict_frames >= frames:
            raise ConfigError(f"{self.cfg.label('predict_frames')} ({self.cfg.predict_frames}) must be smaller than "
                              f"the model's frames ({frames})")
        return ckpt

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        tokens = batch[0]
        net = unwrap(model)
        mask = token_mask(tokens.shape[0], tokens[0].numel(), tokens.device).view_as(tokens)
        logits = model(tokens.masked_fill(mask, net.mask_id))
        # mean over the masked tokens without selecting them (a boolean index would wait for the GPU)
        ce = F.cross_entropy(logits.float().flatten(0, -2), tokens.flatten(), reduction="none",
                             label_smoothing=self.label_smoothing)
        weight = mask.flatten().float()
        loss = (ce * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, {"ce": loss.detach()}

    def eval_mask(self, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.cfg.predict_frames:
            mask = torch.zeros_like(tokens, dtype=torch.bool)
            mask[:, -self.cfg.predict_frames:] = True
            return mask
        return token_mask(tokens.shape[0], tokens[0].numel(), tokens.device, generator,
                          self.cfg.eval_mask_ratio).view_as(tokens)

    @evaluation
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                 lpips: nn.Module | None = None) -> dict:
        """CE and accuracy on held-out masked tokens (masks from a fixed seed, or the last frames); with ``lpips``
        and a decoder, LPIPS between decoded frames holding masked tokens (filled by iterative decoding) and the
        decoded ground truth."""
        decoder = load_decoder(self.cfg.decoder) if lpips is not None and self.cfg.decoder else None
        gen = torch.Generator().manual_seed(0)
        ce_sum, correct, count, lp_sum, frames = 0.0, 0, 0, 0.0, 0
        for batch in loader:
            tokens = batch[0].to(device, non_blocking=True)
            mask = self.eval_mask(tokens, gen)
            with autocast(device, precision):
                logits = model(tokens.masked_fill(mask, unwrap(model).mask_id)).float()
            ce_sum += F.cross_entropy(logits[mask], tokens[mask], reduction="sum").item()
            correct += (logits[mask].argmax(-1) == tokens[mask]).sum().item()
            count += int(mask.sum())
            if decoder is not None:
                filled = fill_masked(model, tokens, mask, self.cfg.sample_steps, precision)
                pred_img, true_img = decoded_frames(decoder, filled, device), decoded_frames(decoder, tokens, device)
                keep = mask.flatten(2).any(-1).flatten()  # frames that held masked tokens
                lp_sum += lpips_distance(pred_img[keep], true_img[keep], lpips).sum().item()
                frames += int(keep.sum())
        out = {"ce": ce_sum / max(count, 1), "accuracy": correct / max(count, 1)}
        if decoder is not None:
            out["lpips"] = lp_sum / max(frames, 1)
        return out
