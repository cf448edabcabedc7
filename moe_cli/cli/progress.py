"""Rich progress for the training loop: a bar with loss, lr, images/s and expert balance; eval lines."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moe_cli.cli.common import STATE, console
from moe_cli.train.loop import Reporter


class RichReporter(Reporter):
    def __init__(self, title: str = "train"):
        self.title = title
        self.progress: Progress | None = None
        self.task = None

    def start(self, total_steps: int, step: int) -> None:
        if STATE["quiet"]:
            return
        self.progress = Progress(TextColumn(f"[bold]{self.title}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(self.title, total=total_steps, completed=step, stats="")

    def log(self, record: dict) -> None:
        if self.progress is None:
            return
        stats = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['img_s']:.0f} img/s"
        if "expert_imbalance" in record:
            stats += f"  load max/mean {record['expert_imbalance']:.2f}"
        self.progress.update(self.task, completed=record["step"], stats=stats)

    def evaluated(self, record: dict) -> None:
        text = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "split"))
        self.message(f"step {record['step']} val: {text}")

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        elif not STATE["quiet"]:
            console.print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
