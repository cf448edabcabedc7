"""Rich progress for the training loop: a bar with loss, lr, images/s and expert balance; eval lines.

While running, the bar shows the last log window's loss and speed and the time left (``ETA``); when the run ends
it shows the whole run's average speed and its total time (``took``). When the output is not a terminal (a log
file, a pipe), no bar is drawn: one plain line per log step (step, loss, lr, speed, load, ETA) instead. ``load``
is the busiest expert's tokens over the mean per expert (1.00: perfectly even), explained once when it first appears.
"""

from __future__ import annotations

import os
import time

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moe_cli.cli.common import STATE, console, err_console
from moe_cli.train.loop import Reporter

UNITS = {"image": "img", "token": "tok"}  # a task's unit as the speed column shows it


def clock(seconds: float) -> str:
    """h:mm:ss, as the bar's time column shows it."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RichReporter(Reporter):
    def __init__(self, title: str = "train"):
        self.title = title
        self.progress: Progress | None = None
        self.task = None
        self.total = 0
        self.seen = 0.0  # units (images, tokens) seen by the run, summed from each log window's speed and length
        self.started = self.last = 0.0
        self.record: dict | None = None
        self.explained = False
        self.plain = False  # not a terminal: plain lines
        self.first = 0
        # under torchrun every process trains, rank 0 alone reports (one bar, one legend, one set of lines)
        self.other_rank = os.environ.get("RANK", "0") not in ("", "0")

    def start(self, total_steps: int, step: int) -> None:
        if STATE["quiet"] or self.other_rank:
            return
        self.total = total_steps
        self.first = step
        self.started = self.last = time.perf_counter()
        if not console.is_terminal:  # a log file: plain lines at log steps, no bar
            self.plain = True
            return
        self.progress = Progress(TextColumn(f"[bold]{self.title}"), BarColumn(bar_width=None if console.width > 120
                                                                              else 12),
                                 MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                                 TextColumn("{task.fields[when]}"), TimeRemainingColumn(elapsed_when_finished=True),
                                 console=console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(self.title, total=total_steps, completed=step, stats="", when="ETA")

    def log(self, record: dict) -> None:
        if self.progress is None and not self.plain:
            return
        now = time.perf_counter()
        self.seen += record["speed"] * (now - self.last)
        self.last, self.record = now, record
        if "expert_imbalance" in record and not self.explained:
            self.explained = True
            self.message("load: tokens of the busiest expert / mean tokens per expert (1.00 = even)")
        if self.plain:
            done = record["step"] - self.first
            left = (now - self.started) / done * (self.total - record["step"]) if done > 0 else 0.0
            console.print(f"{self.title} step {record['step']}/{self.total}  {self.stats(record, room=None)}  "
                          f"ETA {clock(left)}", soft_wrap=True, highlight=False)
            return
        self.progress.update(self.task, completed=record["step"], stats=self.stats(record))

    def stats(self, record: dict, average: bool = False, room: int | None = -1) -> str:
        """The fields that fit the terminal, most important first (metrics.jsonl has the full record);
        ``average``: the speed is the whole run's; ``room`` None: all fields (a plain log line)."""
        unit = UNITS.get(record.get("unit"), record.get("unit", "img"))
        fields = [f"loss {record['loss']:.4f}", f"{record['speed']:.0f} {unit}/s" + (" avg" if average else "")]
        if "expert_imbalance" in record:  # max/mean tokens per expert
            fields.append(f"load {record['expert_imbalance']:.2f}")
        fields.append(f"lr {record['lr']:.1e}")
        if room is None:
            return "  ".join(fields)
        # title, a 12-wide bar, "step/total", "ETA" and the time remaining (h:mm:ss), the spaces between the columns
        room = console.width - len(self.title) - 12 - (2 * len(str(self.total)) + 1) - 4 - 7 - 6
        shown = fields[:1]  # the loss, always
        for field in fields[1:]:
            if len("  ".join([*shown, field])) > room:
                break
            shown.append(field)
        return "  ".join(shown)

    def evaluated(self, record: dict) -> None:
        text = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "split"))
        self.message(f"step {record['step']} val: {text}")

    def message(self, text: str) -> None:
        if self.other_rank:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        elif not STATE["quiet"]:
            console.print(text)

    def warning(self, text: str) -> None:
        """One line, also with --quiet (on stderr); rank 0's under torchrun."""
        if self.other_rank:
            return
        line = f"[bold yellow]warning:[/] {escape(text)}"
        if self.progress is not None:
            self.progress.console.print(line, soft_wrap=True)
        else:
            err_console.print(line, soft_wrap=True)

    def close(self) -> None:
        """The finished bar: the last loss, the run's average speed over all its steps, and its total time."""
        if self.plain and self.record is not None and self.last > self.started:
            run = {**self.record, "speed": self.seen / (self.last - self.started)}
            console.print(f"{self.title} done: {self.total} steps  {self.stats(run, average=True, room=None)}  took "
                          f"{clock(self.last - self.started)}", soft_wrap=True, highlight=False)
        if self.progress is None:
            return
        if self.record is not None and self.last > self.started:
            run = {**self.record, "speed": self.seen / (self.last - self.started)}
            self.progress.update(self.task, stats=self.stats(run, average=True), when="took")
        self.progress.stop()
        self.progress = None
