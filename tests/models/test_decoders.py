"""Token decoders for LPIPS: the built-in palette decoder and the user's module:function, imported only when named."""

import pytest
import torch

from moe_cli.errors import ConfigError
from moe_cli.models.decoders import load_decoder, palette_decoder


def test_palette_decoder_and_decoder_specs(tmp_path):
    imgs = palette_decoder(torch.tensor([[[[0, 1], [1, 0]]]]))
    assert imgs.shape == (1, 1, 3, 16, 16) and imgs.min() >= -1 and imgs.max() <= 1
    assert torch.equal(imgs[0, 0, :, 0, 0], imgs[0, 0, :, 8, 8]) and not torch.equal(imgs[0, 0, :, 0, 0],
                                                                                       imgs[0, 0, :, 0, 8])
    assert load_decoder("moe_cli.data.tokens:palette_decoder").__wrapped__ is palette_decoder  # the name recipes use
    (tmp_path / "dec.py").write_text("def decode(t):\n    return t\n")
    assert load_decoder(f"{tmp_path / 'dec.py'}:decode")(5) == 5
    for spec, needle in (("nope", "module:function"), ("no_such_mod:f", "cannot import"),
                         ("moe_cli.data.tokens:nothing", "no function"), ("missing.py:f", "not found")):
        with pytest.raises(ConfigError, match=needle):
            load_decoder(spec)
