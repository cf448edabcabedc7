"""The training progress line stays readable in an 80-column terminal: fields are dropped by priority, never cut."""

from moe_cli.cli.common import console
from moe_cli.cli.progress import RichReporter

RECORD = {"step": 40, "loss": 0.51843, "lr": 1e-3, "speed": 267.3, "unit": "image", "expert_imbalance": 1.1034}


def test_fields_fit_and_drop_by_priority():
    old = console.width
    try:
        r = RichReporter("classify")
        r.total = 2000
        console.width = 200
        assert r.stats(RECORD) == "loss 0.5184  267 img/s  load 1.10  lr 1.0e-03"
        console.width = 80
        line = r.stats(RECORD)
        assert line.startswith("loss 0.5184  267 img/s") and "…" not in line
        assert len("classify") + 12 + len("2000/2000") + len(line) + 7 + 5 <= 80
        console.width = 50
        assert r.stats(RECORD) == "loss 0.5184"
        console.width = 200  # a language model's speed is in tokens
        assert r.stats({**RECORD, "speed": 51200.0, "unit": "token"}).startswith("loss 0.5184  51200 tok/s")
    finally:
        console.width = old


def test_help_fits_80_columns_and_lists_every_choice():
    from typer.testing import CliRunner

    from moe_cli.cli.app import app

    usage = {"upcycle": "MODEL", "finetune": "RECIPE", "densify-to-sparse": "RECIPE", "eval": "CKPT",
             "inspect": "CKPT", "export": "CKPT", "merge": "CKPT", "prune": "CKPT", "push": "CKPT ORG/NAME"}
    for command, args in usage.items():
        r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"}, prog_name="moe")
        assert r.exit_code == 0
        assert all(len(line) <= 80 for line in r.stdout.splitlines()), command
        # Unix usage and types as typed: not typer's `{model}`, `<int range>`, `<list[str]>`
        assert r.stdout.splitlines()[0] == f"Usage: moe {command} [OPTIONS] {args}"
        assert not any(bad in r.stdout for bad in ("{", " range>", "list["))
        assert max(len(line) for line in r.stdout.splitlines()) > 60  # it did wrap to the terminal, not to 40
        if command == "upcycle":
            assert "<topk|sigmoid_topk|top_p|soft|expert_choice>" in r.stdout
            assert "<auto|triton|grouped|loop>" in r.stdout
        if command == "eval":
            text = " ".join(r.stdout.split())
            from moe_cli.tasks import metric_names

            assert ", ".join(metric_names()) in text and "<fp32|bf16|fp16>" in text  # from the task registry
            assert "perplexity" in text


def test_densify_summary_table_fits_80_columns_without_cutting():
    from rich.console import Console

    from moe_cli.cli.densify import report_table

    stage = {"accuracy": 0.9582, "ce": 0.2114, "variation": 12.023, "gflops_per_image": 0.1818, "params_total": 85.4e6,
             "params_active": 31.8e6, "trainable_params": 12345}
    console = Console(width=80, record=True)
    console.print(report_table({"stages": {n: stage for n in ("dense", "distill", "finetune")}}))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "finetune" in text and "85.40M" in text


def test_finished_bar_shows_the_run_average_speed_and_load_is_explained(monkeypatch):
    import moe_cli.cli.progress as progress

    clock = iter([0.0, 1.0, 3.0])  # start; a 1 s window at 100 img/s; a 2 s window at 400 img/s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    old = console.width, console.record
    console.width, console.record = 100, True
    try:
        console.export_text()  # drop what was recorded before
        r = RichReporter("classify")
        r.start(2, 0)
        r.log({**RECORD, "step": 1, "speed": 100.0})
        r.log({**RECORD, "step": 2, "speed": 400.0})
        r.close()
        text = console.export_text()
    finally:
        console.width, console.record = old
    assert text.count("load: tokens of the busiest expert / mean tokens per expert") == 1
    assert "300 img/s avg" in text.splitlines()[-1]  # (100 x 1 s + 400 x 2 s) / 3 s, not the last window's 400
