"""`genie`: the 1X GENIE objective and evaluation protocol, on the `genie` model family.

Training (the original collator): every factored digit of every frame is replaced by a random digit with
probability ``max_corrupt_rate * u`` (u ~ U(0, 1) per batch); with probability ``non_mlm_ratio`` the frames from
a random ``first`` in [num_prompt_frames, T-1] on are corrupted further (c ~ U(.25, 1), c *= U(.9, 1) per frame,
each digit replaced with probability 1 - c), else ``first`` = 1; then each token of the frames >= first is
masked with probability cos(pi/2 u), u ~ U(0, 1) per (clip, frame). Frame 0 is context. The loss is the sum
over the token factors of the cross-entropy, averaged over the masked tokens of frames 1..T-1.

Evaluation (the original's protocol): for t = 1..T-1, frames < t are given and frames >= t masked; frame t is
generated with ``maskgit_steps`` greedy MaskGIT steps (random re-masking order from ``seed``). CE (summed over
factors) on the first step's logits, token accuracy of the generated frame, and LPIPS-AlexNet between decoded
generated and true frames through a user decoder ``module:function`` (tokens -> images in [-1, 1]).
"""

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
from moe_cli.models.genie import Genie, factorize, unfactorize
from moe_cli.models.lpips import lpips_distance
from moe_cli.runtime import autocast
from moe_cli.tasks.base import TaskData, TokenTask, evaluation, unwrap


@dataclass(frozen=True)
class GenieTaskCfg(Checked):
    """The GENIE objective and evaluation protocol (1X world-model challenge; recipe section `genie`)."""

    maskgit_steps: int = 2  # eval: MaskGIT steps per generated frame
    decoder: str | None = None  # module:function, tokens (B,F,H,W) -> images (B,F,C,h,w) in [-1, 1], for LPIPS
    eval_max_batches: int | None = None  # eval: stop after this many validation batches (None: all)
    seed: int = 42  # eval: the re-masking order of MaskGIT decoding

    def validate(self, label: Label) -> GenieTaskCfg:
        check(self.maskgit_steps >= 1, label("maskgit_steps"), "an integer >= 1", self.maskgit_steps)
        check(self.eval_max_batches is None or self.eval_max_batches >= 1, label("eval_max_batches"),
              "an integer >= 1 or null (all batches)", self.eval_max_batches)
        return self


def _u(*shape, device, generator=None) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, device="cpu" if generator is not None else device).to(device)


def corrupt_and_mask(tokens: torch.Tensor, net: Genie, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training input for clean ``tokens`` (B, T, H, W): random digit corruption, then MaskGIT masking of the
    frames from ``first`` on (see the module docstring). Draws from torch's RNG only (exact resume)."""
    cfg, dev = net.cfg, tokens.device
    b, t = tokens.shape[:2]
    digits = factorize(tokens, net.num_factors, net.factor_vocab)  # (B, T, H, W, F)
    r = _u(*digits.shape, device=dev, generator=generator)
    random_digits = (_u(*digits.shape, device=dev, generator=generator) * net.factor_vocab).long()
    corrupt = r < cfg.max_corrupt_rate * float(_u(1, device="cpu", generator=generator))
    first = 1
    if float(_u(1, device="cpu", generator=generator)) < cfg.non_mlm_ratio and t > 1:
        lo = min(max(cfg.num_prompt_frames, 1), t - 1)
        first = lo + int(float(_u(1, device="cpu", generator=generator)) * (t - lo))
        c = 0.25 + 0.75 * float(_u(1, device="cpu", generator=generator))
        for frame in range(first, t):
            c *= 0.9 + 0.1 * float(_u(1, device="cpu", generator=generator))
            corrupt[:, frame] |= r[:, frame] < 1 - c
    x = unfactorize(torch.where(corrupt, random_digits, digits), net.factor_vocab)
    p = torch.cos(math.pi / 2 * _u(b, t, device=dev, generator=generator))
    mask = _u(*tokens.shape, device=dev, generator=generator) < p[:, :, None, None]
    mask[:, :first] = False
    mask[0, -1, 0, 0] |= ~mask.any()  # at least one masked token per batch, without waiting for the GPU
    return x.masked_fill(mask, net.mask_id)


def factored_ce(net: Genie, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy summed over the factors: logits (B, F*V, T, H, W), targets (B, T, H, W)."""
    lf = net.factor_logits(logits.float())  # (B, V, F, T, H, W)
    tgt = factorize(targets, net.num_factors, net.factor_vocab).movedim(-1, 1)  # (B, F, T, H, W)
    return F.cross_entropy(lf, tgt, reduction="none").sum(1)


@torch.no_grad()
def maskgit_generate(model: nn.Module, prompt: torch.Tensor, t: int, steps: int = 2, generator=None,
                     precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Fill frame ``t`` of ``prompt`` (B, T, H, W; frames >= t masked) in ``steps`` greedy MaskGIT steps: before
    each step but the last, ceil(cos(pi/2 (step+1)/steps) S) of the tokens just sampled are re-masked in random
    order; tokens unmasked earlier are kept. Returns the frame (B, H, W) and the first step's logits
    (B, F*V, H, W)."""
    net = unwrap(model)
    b, _, h, w = prompt.shape
    s = h * w
    cur = prompt.clone()
    masked = torch.ones(b, s, dtype=torch.bool, device=prompt.device)
    first = None
    for step in range(steps):
        with autocast(prompt.device, precision):
            logits = model(cur)[:, :, t].float()
        if first is None:
            first = logits
        digits = logits.reshape(b, net.num_factors, net.factor_vocab, s).argmax(2)  # temperature 0: argmax
        frame = torch.where(masked, unfactorize(digits.transpose(1, 2), net.factor_vocab), cur[:, t].reshape(b, s))
        if step < steps - 1:
            n = math.ceil(math.cos(math.pi / 2 * (step + 1) / steps) * s)
            order = _u(b, s, device=prompt.device, generator=generator).masked_fill(~masked, float("inf"))
            masked = order.argsort(-1).argsort(-1) < n
            frame = frame.masked_fill(masked, net.mask_id)
        cur[:, t] = frame.view(b, h, w)
    return cur[:, t], first


class GenieTask(TokenTask):
    name = "genie"
    Config, section = GenieTaskCfg, "genie"
    data = TaskData(("genie",), "1X token data (`data.name: genie`)", "the folder holding val_v1.1/", "val_v1.1")
    metrics = TokenTask.figures("token accuracy (generated frames)", "cross-entropy (summed over factors)",
                                "LPIPS (AlexNet, generated frames)")

    def prepare(self, ckpt: Checkpoint, model: ModelCfg, data: DataCfg) -> Checkpoint:
        if not isinstance(ckpt.model, Genie):
            raise ConfigError(f"task genie trains GENIE models (hf-hub:1x-technologies/GENIE_35M, a GENIE folder, or "
                              f"the `genie` architecture); {model.source} is a {type(ckpt.model).__name__}")
        return super().prepare(ckpt, model, data)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        tokens = batch[0]
        net = unwrap(model)
        inp = corrupt_and_mask(tokens, net)
        ce = factored_ce(net, model(inp)[:, :, 1:], tokens[:, 1:])
        weight = (inp[:, 1:] == net.mask_id).float()
        loss = (ce * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, {"ce": loss.detach()}

    @evaluation
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                 lpips: nn.Module | None = None) -> dict:
        decoder = load_decoder(self.cfg.decoder) if lpips is not None and self.cfg.decoder else None
        net = unwrap(model)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        ce_sum, correct, count, lp_sum, frames = 0.0, 0, 0, 0.0, 0
        for i, batch in enumerate(loader):
            if self.cfg.eval_max_batches is not None and i >= self.cfg.eval_max_batches:
                break
            x = batch[0].to(device, non_blocking=True)
            generated = []
            for t in range(1, x.shape[1]):
                prompt = x.clone()
                prompt[:, t:] = net.mask_id
                frame, logits = maskgit_generate(model, prompt, t, self.cfg.maskgit_steps, gen, precision)
                ce_sum += factored_ce(net, logits.unsqueeze(2), x[:, t:t + 1]).sum().item()
                correct += (frame == x[:, t]).sum().item()
                count += frame.numel()
                generated.append(frame)
            if decoder is not None:
                pred = decoded_frames(decoder, torch.stack(generated, 1), device)
                true = decoded_frames(decoder, x[:, 1:], device)
                lp_sum += lpips_distance(pred, true, lpips).sum().item()
                frames += pred.shape[0]
        out = {"ce": ce_sum / max(count, 1), "accuracy": correct / max(count, 1)}
        if decoder is not None:
            out["lpips"] = lp_sum / max(frames, 1)
        return out
