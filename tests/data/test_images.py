"""Image folders: an image far larger than any model input is decoded small (JPEG draft, box reduction), one above
the pixel limit is refused in one line naming it before it is decoded, and `moe inspect` on such a folder finishes
in seconds (before: an 8000x8000 folder did not finish within 120 s)."""

import time

import numpy as np
import pytest
import timm
from conftest import one_line
from PIL import Image

from moe_cli.data.loaders import DECODE_SIDE, MAX_IMAGE_PIXELS, open_image
from moe_cli.errors import ConfigError
from moe_cli.io.checkpoint import Checkpoint, save
from moe_cli.models.surgery import upcycle


@pytest.fixture
def moe_ckpt(tmp_path):
    kw = {"depth": 2, "img_size": 32, "num_classes": 10}
    model, _ = upcycle(timm.create_model("vit_tiny_patch16_224", **kw), experts=4, k=2)
    return save(Checkpoint(model, {"name": "vit_tiny_patch16_224", "kwargs": kw}), tmp_path / "ck").parent


def picture(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_a_large_image_is_decoded_small_and_keeps_its_content(tmp_path, fmt):
    path = tmp_path / f"big.{fmt}"
    picture(4000, 3000).save(path)
    img = open_image(path, str(path))
    assert DECODE_SIDE <= max(img.size) < 2 * DECODE_SIDE and img.size[0] / img.size[1] == pytest.approx(4 / 3, 0.01)
    small = np.asarray(picture(4000, 3000).resize(img.size, Image.BOX), dtype=np.float32)
    assert np.abs(np.asarray(img, dtype=np.float32) - small).mean() < 8  # the same picture, not a crop or noise
    path = tmp_path / f"small.{fmt}"
    picture(300, 200).save(path)
    assert open_image(path, str(path)).size == (300, 200)  # small images are read as they are


def test_an_image_above_the_pixel_limit_is_refused_before_decoding(tmp_path, cli, moe_ckpt):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 500  # 8000 x 8000 was the reported case
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        picture(64, 64).save(tmp_path / "imgs" / c / "a.png")
    Image.new("RGB", (side, side)).save(tmp_path / "imgs" / "dog" / "huge.jpg")
    with pytest.raises(ConfigError, match=f"huge.jpg is {side}x{side} pixels"):
        open_image(tmp_path / "imgs" / "dog" / "huge.jpg", "huge.jpg")
    t0 = time.perf_counter()
    one_line(cli("inspect", str(moe_ckpt), "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")),
             f"above moe-cli's limit of {MAX_IMAGE_PIXELS / 1e6:.0f} MP per image; downscale the images")
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "o").exists()


def test_inspect_of_a_folder_of_large_photos_finishes_in_seconds(tmp_path, cli, moe_ckpt):
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            picture(6000, 4500).save(tmp_path / "imgs" / c / f"{i}.jpg", quality=80)
    t0 = time.perf_counter()
    r = cli("inspect", str(moe_ckpt), "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"),
            "--images", "2")
    assert r.exit_code == 0, r.output
    assert "4 images" in r.output  # says what it reads
    assert time.perf_counter() - t0 < 60
