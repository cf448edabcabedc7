"""Every rule about a recipe field is reported in the recipe's words (```model.upcycle.layers` in r.yaml``), never
as a command-line flag — those checked when the recipe is read and those that need the model (a layer index, a
target glob, a hidden size experts must divide), which go through the label the config was made with."""

import pytest
from conftest import TINY_RECIPE

from moe_cli.errors import ConfigError
from moe_cli.recipe import recipe_from_dict
from moe_cli.train.build import build_model

UP = {"experts": 4, "k": 2}
EVA = {"source": "eva02_tiny_patch14_224", "pretrained": False,
       "kwargs": {"depth": 2, "img_size": 28, "scale_mlp": True, "num_classes": 10}}
TOKENS = {"source": "maskgit_video", "pretrained": False,
          "kwargs": {"vocab_size": 16, "frames": 2, "height": 2, "width": 2, "embed_dim": 32, "depth": 1,
                     "num_heads": 2}}


def recipe(model=None, upcycle=None, **sections):
    data = {**TINY_RECIPE, **sections}
    data["model"] = {**TINY_RECIPE["model"], **(model or {})}
    if upcycle is not None:
        data["model"]["upcycle"] = upcycle
    return data


CASES = [  # (recipe, needs the model, what the message must say)
    (recipe(upcycle={**UP, "layers": "every-0"}), False,
     "`model.upcycle.layers` in r.yaml must be every-N with N >= 1"),
    (recipe(upcycle={**UP, "layers": "last-0"}), False, "`model.upcycle.layers` in r.yaml must be last-N with N >= 1"),
    (recipe(upcycle={**UP, "layers": "a,b"}), False, "`model.upcycle.layers` in r.yaml must be all, every-N"),
    (recipe(upcycle={**UP, "layers": "0,-1"}), False, "`model.upcycle.layers` in r.yaml must be indices >= 0"),
    (recipe(upcycle={**UP, "layers": "0,9"}), True, "`model.upcycle.layers` in r.yaml: index 9 out of range"),
    (recipe(upcycle={**UP, "layers": "last-5"}), True, "`model.upcycle.layers` in r.yaml 'last-5': the model has 2"),
    (recipe(upcycle={**UP, "target": "nothing.*"}), True, "`model.upcycle.target` in r.yaml 'nothing.*' matches no"),
    (recipe(upcycle={**UP, "target": "blocks.*.attn"}), True,
     "`model.upcycle.target` in r.yaml matched `blocks.0.attn`"),
    (recipe(upcycle={"experts": 5, "k": 2, "init": "split"}), True,
     "`model.upcycle.init` in r.yaml split needs the hidden size (256) to be a multiple of `model.upcycle.experts`"),
    (recipe(model=EVA, upcycle={"experts": 4, "k": 2, "init": "split"}), True,
     "`model.upcycle.init` in r.yaml split needs FFNs without a hidden LayerNorm"),
    (recipe(upcycle={**UP, "init": "drop", "drop_ratio": 1.5}), False, "`model.upcycle.drop_ratio` in r.yaml must be"),
    (recipe(upcycle={**UP, "router_init": "kmeans"}), False,
     "`model.upcycle.router_init` in r.yaml kmeans learns from data: give `model.upcycle.calib`"),
    (recipe(upcycle={**UP, "router_init": "activation", "calib": "digits"}), False,
     "it needs `model.upcycle.init` in r.yaml split"),
    (recipe(upcycle={**UP, "gate": "soft", "init": "split"}), False,
     "use `model.upcycle.gate` in r.yaml topk or top_p"),
    (recipe(upcycle={**UP, "gate": "soft", "normalize": False}), False,
     "`model.upcycle.normalize` in r.yaml only applies to `model.upcycle.gate` in r.yaml topk"),
    (recipe(upcycle={**UP, "experts": 2, "k": 3}), False,
     "`model.upcycle.k` in r.yaml must be between 1 and `model.upcycle.experts` in r.yaml (2)"),
    (recipe(upcycle={**UP, "shared_gate": True}), False, "set `model.upcycle.shared_experts` in r.yaml too"),
    (recipe(upcycle={**UP, "experts": 2_000_000}), True, "`model.upcycle.experts` in r.yaml 2000000 needs about"),
    (recipe(densify={"experts": 1}), False, "`densify.experts` in r.yaml must be an integer >= 2"),
    (recipe(densify={"experts": 4, "k": 9}), False, "`densify.k` in r.yaml must be between 1 and `densify.experts`"),
    (recipe(densify={"experts": 4, "stage2": {"steps": 0}}), False, "`densify.stage2.steps` in r.yaml must be"),
    (recipe(model=TOKENS, task="masked-tokens", data={"name": "tokens", "root": "t"},
            masked_tokens={"predict_frames": 2}), True,
     "`masked_tokens.predict_frames` in r.yaml (2) must be smaller than the model's frames (2)"),
    (recipe(model=TOKENS, task="masked-tokens", data={"name": "tokens"}), False,
     "`data.root` in r.yaml is required for token data"),
    (recipe(task="genie"), False, "r.yaml: task `genie` trains on 1X token data"),
    (recipe(train={"steps": 1, "precision": "fp16", "parallel": "fsdp"}), False,
     "`train.precision` in r.yaml: fp16 loss scaling is not supported"),
]


@pytest.mark.parametrize("data,needs_model,needle", CASES, ids=[c[2][:48] for c in CASES])
def test_every_recipe_error_names_the_recipe_field(data, needs_model, needle):
    if needs_model:
        r = recipe_from_dict(data, "r.yaml")  # a valid recipe: what is wrong shows against the model
        with pytest.raises(ConfigError) as e:
            build_model(r)
    else:
        with pytest.raises(ConfigError) as e:
            recipe_from_dict(data, "r.yaml")
    message = str(e.value)
    assert needle in message, message
    assert "--" not in message.replace("`--set", ""), message  # no command-line flag in a recipe's error
    assert "\n" not in message


def test_the_library_speaks_argument_names_and_the_cli_flags(cli, tmp_path):
    import timm

    from moe_cli.models.overrides import apply_overrides
    from moe_cli.models.reduce import prune
    from moe_cli.models.surgery import upcycle
    from moe_cli.moe.config import UpcycleCfg

    def tiny():
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=10)

    with pytest.raises(ConfigError, match=r"^layers: index 9 out of range"):
        upcycle(tiny(), experts=4, k=2, layers="0,9")
    with pytest.raises(ConfigError, match=r"^layers must be every-N"):
        UpcycleCfg(layers="every-0")
    model, _ = upcycle(tiny(), experts=4, k=2)
    with pytest.raises(ConfigError, match=r"^keep must be between 1 and 4"):
        prune(model, keep=9, usage_of=lambda m: None)
    with pytest.raises(ConfigError, match=r"^give exactly one of keep N and drop_experts"):
        prune(model)
    with pytest.raises(ConfigError, match=r"^disable_experts expects LAYER:EXPERT"):
        apply_overrides(model, disable_experts="x")
    with pytest.raises(ConfigError, match=r"^top_k does not apply"):
        apply_overrides(upcycle(tiny(), experts=4, k=2, gate="expert_choice")[0], top_k=1)
    # the same rules on the command line, in its words
    assert cli("upcycle", "vit_tiny_patch16_224", "--no-pretrained", "-m", "depth=2", "-m", "img_size=32",
               "--out", str(tmp_path / "m")).exit_code == 0
    r = cli("prune", str(tmp_path / "m"), "--keep", "9", "--out", str(tmp_path / "p"))
    assert r.exit_code == 2 and "--keep must be between 1 and 4" in r.stderr
    r = cli("eval", str(tmp_path / "m"), "--disable-experts", "x")
    assert r.exit_code == 2 and "--disable-experts expects LAYER:EXPERT" in r.stderr
    r = cli("upcycle", "vit_tiny_patch16_224", "--no-pretrained", "-m", "depth=2", "--layers", "0,9",
            "--out", str(tmp_path / "x"))
    assert r.exit_code == 2 and "--layers: index 9 out of range" in r.stderr


def test_overrides_that_only_make_sense_together_are_checked_together():
    """`shared_gate` needs `shared_experts`: given by two --set, in either order, the recipe is valid; a value is
    named by the --set it came from, the rest by the file."""
    data = recipe(upcycle=UP)
    for order in (["model.upcycle.shared_gate=true", "model.upcycle.shared_experts=1"],
                  ["model.upcycle.shared_experts=1", "model.upcycle.shared_gate=true"]):
        r = recipe_from_dict(data, "r.yaml", order)
        assert r.model.upcycle.shared_experts == 1 and r.model.upcycle.shared_gate
    with pytest.raises(ConfigError, match=r"^`model.upcycle.k` in `--set model.upcycle.k=9` must be between 1 and "
                                          r"`model.upcycle.experts` in r.yaml \(4\)"):
        recipe_from_dict(data, "r.yaml", ["model.upcycle.k=9"])
    with pytest.raises(ConfigError, match=r"`model.upcycle.k` in `--set model.upcycle={experts: 2, k: 3}`"):
        recipe_from_dict(data, "r.yaml", ["model.upcycle={experts: 2, k: 3}"])
