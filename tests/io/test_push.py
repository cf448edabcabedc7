"""`moe push` fails in one line, within seconds, and writes nothing when it cannot work: a repository id the Hub
would refuse (checked with huggingface_hub's own validator, for the real push and for --dry-run alike), no
network, or HF_HUB_OFFLINE set."""

import os
import subprocess
import sys
import time

import pytest
from conftest import one_line, run_moe, write_recipe


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    from typer.testing import CliRunner

    from moe_cli.cli.app import app

    tmp = tmp_path_factory.mktemp("push")
    f = write_recipe(tmp / "r.yaml", tmp / "run", train={"steps": 1, "batch_size": 8})
    assert CliRunner().invoke(app, ["finetune", f], catch_exceptions=False).exit_code == 0
    return tmp / "run" / "final"


@pytest.mark.parametrize("repo", ["org/na me", "org/..", "../name", "org/a\nb", "hf-hub:org/name", "a--b",
                                  "org/a--b", "org/" + "x" * 97, "org/x.git", "no-slash", "a/b/c"])
@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "push"])
def test_a_repo_id_the_hub_refuses_is_one_line(cli, final, tmp_path, repo, dry):
    args = ["push", str(final), repo] + (["--dry-run", str(tmp_path / "dry")] if dry else [])
    one_line(cli(*args), "is not a Hub repository id")
    assert not (tmp_path / "dry").exists()


def test_push_without_network_is_one_line_within_seconds(final):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # loopback, nothing listens: the connection is refused at once
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "moe_cli", "push", str(final), "me/model"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert time.perf_counter() - t0 < 60
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: cannot reach the Hugging Face Hub")
    assert "Traceback" not in r.stderr


def test_push_with_hf_hub_offline_says_so(final):
    r = run_moe("push", str(final), "me/model", env={"HF_HUB_OFFLINE": "1"})
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0], r.stderr
