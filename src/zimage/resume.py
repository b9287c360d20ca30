"""Resuming a run: which outputs are already made with the job's settings, which may not be replaced, and the
leftovers of writes that a crash cut short."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import UsageError
from .jobs import Job

# metadata that says how or where a run went, not what image it makes
RUN_SPECIFIC = frozenset({"model_path", "model_path_given", "seconds", "version"})


def comparable(meta: dict) -> dict:
    """The settings of an image's metadata, as JSON would store them: every field but the run-specific ones,
    the model by folder name (the same checkpoint may sit elsewhere on another machine)."""
    out = {k: v for k, v in meta.items() if k not in RUN_SPECIFIC}
    if isinstance(out.get("model"), str):
        out["model"] = Path(out["model"]).name
    return json.loads(json.dumps(out))


def difference(stored: dict, wanted: dict) -> str | None:
    """The first setting that differs between two metadata dicts, in words; None when all are equal."""
    stored, wanted = comparable(stored), comparable(wanted)
    for key in [*wanted, *(k for k in stored if k not in wanted)]:
        if stored.get(key) != wanted.get(key):
            there = json.dumps(stored[key], ensure_ascii=False) if key in stored else "none"
            now = json.dumps(wanted[key], ensure_ascii=False) if key in wanted else "none"
            return f"{key} {there[:60]} there, {now[:60]} now"
    return None


def stored_metadata(path: Path) -> dict | None:
    """The zimage metadata of a picture, or None when it has none that can be read."""
    from .images import read_settings

    try:
        meta = read_settings(path)
    except (OSError, ValueError, SyntaxError):  # PIL raises SyntaxError for some broken headers
        return None
    return meta if isinstance(meta, dict) else None


def is_complete(path: Path, width: int, height: int) -> bool:
    """Whether the picture decodes to the end at the expected size (a cut-off file does not)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.size == (width, height)
    except (OSError, ValueError, SyntaxError):
        return False


@dataclass(frozen=True)
class Triage:
    todo: list[Job]  # to make (those with write=False are made only to keep their batch whole)
    done: list[Job]  # already made with the same settings: skipped
    blocked: list[tuple[Job, str]]  # the file exists and may not be replaced
    stale: list[Path]  # cut-off images of these very jobs, to remove before the run


def state(job: Job) -> str:
    """'missing', 'done' (complete, same settings), 'partial' (same settings, cut off) or why it differs."""
    if not job.output.exists():
        return "missing"
    meta = stored_metadata(job.output)
    if meta is None:
        return "it carries no zimage settings"
    if diff := difference(meta, job.metadata):
        return f"it was made with other settings ({diff})"
    s = job.settings
    return "done" if is_complete(job.output, s.width, s.height) else "partial"


def triage(batches: list[list[Job]], overwrite: bool, skip_existing: bool) -> Triage:
    """Sort the jobs of planned batches by the state of their files.

    Without `skip_existing` an existing file is replaced with `overwrite` and blocks its job otherwise. With it,
    a complete file carrying the job's settings is skipped, a cut-off one is made again, and one with other
    settings is a usage error naming it unless `overwrite`. A batch with any job left runs whole, so every
    image comes out of the same batch, and so bit for bit the same, as in an uninterrupted run."""
    todo: list[Job] = []
    done: list[Job] = []
    blocked: list[tuple[Job, str]] = []
    stale: list[Path] = []
    for batch in batches:
        made: set[int] = set()
        for job in batch:
            if not job.output.exists() or (overwrite and not skip_existing):
                continue
            if not skip_existing:
                blocked.append((job, f"{job.origin}: {job.output} exists (use --overwrite to replace it); "
                                     "--skip-existing keeps finished images"))
                made.add(job.index)
                continue
            what = state(job)
            if what == "done":
                made.add(job.index)
            elif what == "partial":
                stale.append(job.output)
            elif not overwrite:
                raise UsageError(f"{job.output} exists but {what}; use --overwrite to replace it")
        blocked_here = {j.index for j, _ in blocked}
        if all(j.index in made for j in batch):
            done += [j for j in batch if j.index not in blocked_here]
            continue
        done += [j for j in batch if j.index in made and j.index not in blocked_here]
        todo += [replace(j, write=False) if j.index in made else j for j in batch]
    return Triage(todo, done, blocked, stale)


def part_files(jobs: list[Job]) -> list[Path]:
    """Temporary files that images.save_image left beside these jobs' outputs when it was killed mid-write."""
    return [Path(p) for j in jobs for p in glob.glob(str(j.output.parent / f".{glob.escape(j.output.name)}.*.part"))]


def clean(jobs: list[Job], stale: list[Path]) -> None:
    """Remove the leftovers of interrupted writes of `jobs` (their own .part files only) and the cut-off images
    that triage found, so the run writes them afresh."""
    for p in [*part_files(jobs), *stale]:
        p.unlink(missing_ok=True)
