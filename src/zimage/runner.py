"""Making a run's images: the loop between the plan and the summary, reporting each image as it is written."""

from __future__ import annotations

import json
import logging

import typer

from .clihelp import EXIT_INTERRUPTED
from .jobs import Job
from .report import err, record

log = logging.getLogger("zimage")


def run_jobs(opts, todo: list[Job], done: list[Job], batch_size: int, json_out: bool) -> tuple[list[dict], list[str]]:
    """Make the images of `todo`, reporting each as it is written; `done` ones were made before and are
    reported as skipped. Loads no model when nothing is left to write. Returns the records of all, in job
    order, and the failures; exits 130 on Ctrl-C after saying which images were written."""
    from .pipeline import Pipeline

    records = [record(j) for j in done]
    if json_out:
        for r in records:
            typer.echo(json.dumps(r))
    to_write = [j for j in todo if j.write]
    written: list[Job] = []
    failed: list[str] = []

    def on_image(job: Job, seconds: float) -> None:
        written.append(job)
        records.append(record(job, seconds))
        if json_out:
            typer.echo(json.dumps(records[-1]))
        if len(to_write) > 1:
            log.info("wrote %s (seed %d, %.1fs)", job.output, job.settings.seed, seconds)

    def on_error(job: Job, message: str) -> None:
        failed.append(message)
        err(f"failed: {job.origin}: {message}")

    def summary(what: str) -> str:
        return f"{what}: {len(written)} of {len(to_write)} image(s) written" + "".join(f"\n  {j.output}" for j in written)

    if to_write:
        try:
            Pipeline(opts).run(todo, batch_size, on_image, on_error)
        except KeyboardInterrupt:
            err(summary("interrupted"))
            raise typer.Exit(EXIT_INTERRUPTED)
        except Exception:
            if written:  # the error is reported by the caller; first say what was saved before it
                err(summary("stopped"))
            raise
    return sorted(records, key=lambda r: r["index"]), failed
