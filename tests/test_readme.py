"""The README's examples run as written, in the README's order (the README cannot rot).

Every ```bash and ```python block of README.md runs in a scratch folder, one after the other, unless the line
just before it says what it needs (`*Needs: network ...*`, `*Needs: a CUDA GPU.*`, ...): those are checked to
say so and skipped. Set-up commands (venv, pip install, pytest) count as done: CI ran them. The one change
allowed: the folder's recipes/ are copies of the real ones with tiny lengths (2 training steps, 1 step per
densify stage), so the whole chain takes a few minutes instead of hours.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install", "pytest")
NEEDS = re.compile(r"^\*Needs: (.+)")
TINY_TRAIN = {"steps": 2, "eval_every": 0, "ckpt_every": 0, "log_every": 1}


def blocks(text: str) -> list[tuple[str, str, str | None, int]]:
    """(language, code, what it needs or None, line) of every bash / python block."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        m = re.match(r"^```(bash|python)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, j = i, i + 1
        while lines[j] != "```":
            j += 1
        before = [ln for ln in lines[max(0, start - 4):start] if ln.strip()]
        need = None
        for ln in before[-3:]:  # the note may wrap over a few lines
            if (n := NEEDS.match(ln)) is not None:
                need = n.group(1)
        out.append((m.group(1), "\n".join(lines[start + 1:j]), need, start + 1))
        i = j + 1
    return out


def tiny_recipe(data: dict) -> dict:
    if "train" in data:
        data["train"] = {**data["train"], **TINY_TRAIN}
    if isinstance(data.get("then"), dict) and "train" in data["then"]:
        data["then"]["train"] = {**data["then"]["train"], **TINY_TRAIN}
    if "densify" in data:
        for stage in ("stage1", "stage2", "stage3"):
            data["densify"][stage] = {**data["densify"].get(stage, {}), "steps": 1}
    return data


def bash_commands(code: str) -> list[str]:
    """The block's commands, continuation lines joined, set-up steps dropped."""
    joined = code.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in line.split("&&")]
        kept = [p for p in parts if not p.startswith(SETUP)]
        if kept:
            commands.append(" && ".join(kept))
    return commands


def test_every_block_that_is_not_runnable_here_says_what_it_needs():
    found = blocks((ROOT / "README.md").read_text())
    assert len(found) >= 15
    for _lang, _code, need, line in found:
        if need is not None:
            assert any(word in need for word in ("network", "GPU", "your")), f"README line {line}: {need}"


@pytest.mark.long
def test_readme_blocks_run_in_order(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    for f in (tmp_path / "recipes").glob("*.yaml"):
        f.write_text(yaml.safe_dump(tiny_recipe(yaml.safe_load(f.read_text())), sort_keys=False))
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
           "MOE_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    ran = 0
    for lang, code, need, line in blocks((ROOT / "README.md").read_text()):
        if need is not None:
            continue
        if lang == "python":
            exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 — the README's own code
            ran += 1
            continue
        script = "set -e\n" + "\n".join(
            f"{c}" if c.startswith(("R=", "export ")) else f"echo '$ {c}' >&2\n{c}" for c in bash_commands(code))
        r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, f"README block at line {line} failed:\n{r.stderr[-3000:]}\n{r.stdout[-2000:]}"
        assert "Traceback" not in r.stderr, f"README block at line {line}:\n{r.stderr[-3000:]}"
        ran += 1
    assert ran >= 10


def test_quick_start_figures_are_ranges_that_hold_a_single_run():
    """The README states each quick-start figure as mean ± spread over seeds (CPU training is not bit-reproducible
    across processors), and what one run printed (seed 0, the quick start itself) lies within it."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Results on digits (CPU)", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (dense ViT|upcycled)[^|]*\| [^|]+ \| ([\d.]+)% ± ([\d.]+)% \| ([\d.]+) ± ([\d.]+) \|$",
                      section, flags=re.M)
    assert [r[0] for r in rows] == ["dense ViT", "upcycled"], section
    seed0 = re.search(r"seed 0 ([\d.]+)% / ([\d.]+) and ([\d.]+)% / ([\d.]+)", section)
    assert seed0 is not None and "three seeds" in section
    printed = [(float(seed0.group(1)), float(seed0.group(2))), (float(seed0.group(3)), float(seed0.group(4)))]
    for (_, acc, acc_sd, ce, ce_sd), (got_acc, got_ce) in zip(rows, printed, strict=True):
        assert abs(got_acc - float(acc)) <= 2 * float(acc_sd) + 1e-9, (got_acc, acc, acc_sd)
        assert abs(got_ce - float(ce)) <= 2 * float(ce_sd) + 1e-9, (got_ce, ce, ce_sd)
