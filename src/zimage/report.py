"""What a batch run says at its end: the --json record of each image and the summary on stderr, for one process
or, at rank 0, for every process of a torchrun group."""

from __future__ import annotations

import json
import logging

import typer

from .inputs import steps_run
from .jobs import Job

EXIT_OK, EXIT_FAILED = 0, 1
log = logging.getLogger("zimage")


def err(message: str) -> None:
    typer.echo(message, err=True)


def record(job: Job, seconds: float | None = None) -> dict:
    """The --json line of a job: written in `seconds`, or skipped (None) because its file was already made."""
    s = job.settings
    r = {"index": job.index, "path": str(job.output), "prompt": s.prompt, "seed": s.seed, "width": s.width,
         "height": s.height, "steps": s.num_steps, "guidance": s.guidance_scale}
    if steps_run(s) != s.num_steps:  # started from a picture: the first steps were skipped
        r["steps_run"] = steps_run(s)
    return {**r, "seconds": round(seconds, 3)} if seconds is not None else {**r, "skipped": True}


def summarize(records: list[dict], failed: int, elapsed: float, processes: int = 1) -> None:
    """The end-of-run line on stderr (not with -q): the file of a single image, or the counts of a batch."""
    written = [r for r in records if not r.get("skipped")]
    if len(records) == 1 and written and not failed:
        r = written[0]
        steps = f"{r['steps_run']} of {r['steps']} steps, " if "steps_run" in r else ""
        log.info("Saved %s (seed %d, %s%.1fs)", r["path"], r["seed"], steps, elapsed)
        return
    by = f" by {processes} processes" if processes > 1 else ""
    log.info("%d image(s) written, %d skipped, %d failed%s, in %.1fs", len(written), len(records) - len(written),
             failed, by, elapsed)


def report_group(results: list[dict | None], json_out: bool, elapsed: float) -> int:
    """Rank 0's report of a torchrun run: every record in job order, the merged summary, the ranks that
    failed or went silent. Returns the exit code of the whole run."""
    records = sorted((r for p in results if p for r in p["records"]), key=lambda r: r["index"])
    if json_out:
        for r in records:
            typer.echo(json.dumps(r))
    summarize(records, sum(p["failed"] for p in results if p), elapsed, len(results))
    bad = False
    for rank, p in enumerate(results):
        if p is None or p["code"]:
            bad = True
            why = "stopped answering" if p is None else f"failed (exit code {p['code']})"
            err(f"rank {rank} {why}; the images written are kept: run again with --skip-existing to finish")
    return EXIT_FAILED if bad or any(p["failed"] for p in results if p) else EXIT_OK
