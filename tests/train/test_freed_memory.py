"""The training commands on the CPU keep freed host memory for the next step (glibc): once the pattern settles, a
block the size of a many-expert layer's weight gradient, made and freed every step, costs no new page faults;
with glibc's default every step faults all its pages in again. In a subprocess: the setting is process-wide."""

import subprocess
import sys

import pytest
from conftest import one_line, write_recipe

from moe_cli.recipe import load_recipe

SCRIPT = """
import resource, sys, torch
from moe_cli.runtime import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
faults = []
for _ in range(16):  # training steps: a 64 MB block (above glibc's largest mmap threshold) made, used, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16_000_000)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-4:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_gradient_sized_block_freed_every_step_is_reused_without_page_faults():
    faults = {mode: int(subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "reuse")}
    if faults["default"] < 8000:  # transparent huge pages on for every allocation: 2 MB pages fault rarely anyway
        pytest.skip(f"this kernel backs large blocks with huge pages ({faults})")
    assert faults["default"] > 4 * 8000, faults  # 64 MB in 4 KB pages: 15,625 faults a step
    assert faults["reuse"] < faults["default"] / 20, faults


def test_the_recipe_switch_is_a_plain_boolean(tmp_path, cli):
    assert load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "out")).train.reuse_host_memory is True
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "out", train={"reuse_host_memory": "yes please"})
    one_line(cli("finetune", f), "`train.reuse_host_memory` in r.yaml must be true/false")
