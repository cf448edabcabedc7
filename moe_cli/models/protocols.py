"""What a model that reads discrete tokens provides (maskgit_video, genie): the typing Protocol the data loaders,
the probe batch and the token tasks ask for, instead of probing attributes one by one."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ProbedModel(Protocol):
    """A model that makes its own example input (token models, language models): the probe batch of the
    upcycling check, instead of random images."""

    def example_input(self, batch: int = 2, generator: torch.Generator | None = None) -> torch.Tensor: ...


@runtime_checkable
class TokenModel(Protocol):
    """A model over token grids (frames, height, width) with ids in [0, vocab_size); ``mask_id`` is [MASK]."""

    vocab_size: int
    mask_id: int

    @property
    def token_shape(self) -> tuple[int, int, int]: ...

    def example_input(self, batch: int = 2, generator: torch.Generator | None = None) -> torch.Tensor: ...


def is_token_model(model: nn.Module) -> bool:
    return isinstance(model, TokenModel)
