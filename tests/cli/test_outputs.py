"""One rule for every command that writes: an existing output is refused in one line unless --overwrite, and the
option is --out / -o everywhere (finetune and densify keep --output as a hidden alias)."""

from conftest import model_args, write_recipe

M = ["vit_tiny_patch16_224", "--no-pretrained", *model_args("vit")]


def refused(r, path):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert f"{path} exists; pass --overwrite to replace it" in lines[0]


def test_every_writing_command_refuses_an_existing_output_without_overwrite(cli, tmp_path):
    up = tmp_path / "moe"
    assert cli("upcycle", *M, "--experts", "2", "--k", "1", "-o", str(up)).exit_code == 0
    before = (up / "model.safetensors").stat().st_mtime_ns
    refused(cli("upcycle", *M, "--experts", "2", "--k", "1", "-o", str(up)), up)
    assert (up / "model.safetensors").stat().st_mtime_ns == before  # untouched
    assert cli("upcycle", *M, "--experts", "2", "--k", "1", "-o", str(up), "--overwrite").exit_code == 0
    for command, extra in (("merge", ["--experts", "1", "--calib", "digits"]),
                           ("prune", ["--keep", "1", "--calib", "digits"]),
                           ("inspect", ["--images", "1", "--data", "digits"]),
                           ("export", [])):
        out = tmp_path / (f"{command}.safetensors" if command == "export" else command)
        assert cli(command, str(up), *extra, "-o", str(out)).exit_code == 0, command
        refused(cli(command, str(up), *extra, "-o", str(out)), out)
        assert cli(command, str(up), *extra, "-o", str(out), "--overwrite").exit_code == 0, command


def test_finetune_takes_out_and_the_old_output_name(cli, tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "ignored", train={"steps": 1})
    assert cli("finetune", f, "--out", str(tmp_path / "a")).exit_code == 0
    assert cli("finetune", f, "--output", str(tmp_path / "b")).exit_code == 0
    assert (tmp_path / "a" / "final").is_dir() and (tmp_path / "b" / "final").is_dir()
    r = cli("finetune", "--help")
    assert "--out" in r.stdout and "--output" not in r.stdout


def test_version_help_and_typos_do_not_import_torch():
    """`moe --version` / `--help` / a typo start in a fraction of a second because they import neither torch nor
    timm (the figure, with its command, is in bench/RESULTS.md; tests do not time)."""
    import subprocess
    import sys

    for args in (["--version"], ["--help"], ["upcyle"]):
        code = (f"import sys\nfrom moe_cli.cli.app import main\nsys.argv = ['moe', *{args!r}]\ntry:\n    main()\n"
                "except SystemExit:\n    pass\n"
                "print('IMPORTED', sorted(m for m in ('torch', 'timm') if m in sys.modules))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.stdout.strip().splitlines()[-1] == "IMPORTED []", (args, r.stdout, r.stderr)


def test_messages_point_at_what_the_user_typed(cli, tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tmp_path / "run", train={"steps": 1})
    r = cli("finetune", f, "--set", "optim.lrr=1")
    assert r.exit_code == 2 and "unknown key `optim.lrr` in `--set optim.lrr=1` — did you mean `optim.lr`?" in r.stderr
    r = cli("finetune", f, "--set", "optim.lr", "3e-4")
    assert r.exit_code == 2 and "--set takes KEY=VALUE as one word" in r.stderr
    assert cli("finetune", f).exit_code == 0
    r = cli("eval", str(tmp_path / "run"))
    assert r.exit_code == 2 and f"{tmp_path / 'run'} is a training run's folder, not a checkpoint; use " \
        f"{tmp_path / 'run' / 'final'}" in r.stderr
