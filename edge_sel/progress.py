"""Progress bars for long work (rich), shared by the CLI and the demo."""

from __future__ import annotations


def export_progress(console):
    """A rich progress display and the ``progress(stage, i, n)`` callback that export calls."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True,
                    disable=not console.is_terminal)  # off a terminal a bar is noise (rich leaves a blank line behind)
    tasks = {}

    def cb(stage, i, n):
        if stage not in tasks:
            label = {"load": "loading model (torch)", "layers": "exporting layers", "verify": "verifying vs torch"}.get(stage, stage)
            tasks[stage] = prog.add_task(label, total=n)
        prog.update(tasks[stage], completed=i, total=n)

    return prog, cb
