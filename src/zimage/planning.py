"""Everything about a `generate` run that can be checked before loading weights: the settings of each image (from
flags, prompt files and `--from-png`), its output file, and the model folder. Imports torch only once the cheap
checks have passed, so that usage errors stay fast."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import MissingFileError, UsageError
from .inputs import recorded_inputs_problem
from .jobs import (Item, Job, Settings, check_template, output_problem, plan_jobs, read_prompts_file, settings_from,
                   settings_problem)
from .layout import DEFAULT_MODEL, missing_hint, require_folder

if TYPE_CHECKING:
    from .modelfiles import ModelFiles

log = logging.getLogger("zimage")


def base_settings(from_png: Optional[Path], **given) -> tuple[dict, dict]:
    """Settings every image starts from: flags given on the command line, over those stored in `--from-png`,
    over the defaults. Returns them and the metadata read from the PNG (empty without one)."""
    meta: dict = {}
    if from_png is not None:
        from .images import read_settings

        if not from_png.is_file():
            raise UsageError(f"--from-png: {from_png} not found")
        try:
            meta = read_settings(from_png)
        except (OSError, ValueError) as e:
            raise UsageError(f"--from-png: {e}") from None
    defaults = {f: getattr(Settings, f) for f in Settings.__dataclass_fields__ if f != "prompt"}
    stored = {k: v for k, v in settings_from(meta).items() if k != "prompt"}  # prompts come as items
    merged = {**defaults, **stored, **{k: v for k, v in given.items() if v is not None}}
    return merged, meta


def plan(prompt: list[str], prompts_file: Optional[str], from_png: Optional[Path], model_path: Optional[Path],
         output: str, num_images: int, given: dict,
         files: Optional[dict] = None) -> tuple[list[Job], list[str], "ModelFiles", Optional[int]]:
    """Everything checkable before loading: settings, prompts, outputs, the model files. Returns the jobs,
    the messages of skipped items (in line order), the ModelFiles of the run, and the seed drawn at random (None
    when one was given). `given` holds the setting flags (None = not given); `files` the single-file flags
    (transformer, text_encoder, vae, tokenizer; None = not given)."""
    from_png = from_png.expanduser() if from_png else None
    base, meta = base_settings(from_png, **given)
    if problem := recorded_inputs_problem(meta, given):
        raise UsageError(problem)
    random_seed = None
    if given["seed"] is None and "seed" not in meta:
        base["seed"] = random_seed = secrets.randbits(32)
    stored_model = model_path is None and "model_path" in meta
    named = model_path or (Path(meta["model_path"]) if stored_model else None)
    check_template(output)  # before formatting it below: an unknown placeholder is a usage error, not a KeyError

    items = [Item({"prompt": p}, f"--prompt {i + 1}", True) for i, p in enumerate(prompt)]
    file_errors: list[tuple[Item, str]] = []
    if prompts_file is not None:
        file_items, file_errors = read_prompts_file(prompts_file)
        items += file_items
        if not file_items and not prompt and not file_errors:
            raise UsageError(f"no prompts in {prompts_file}")
    elif not prompt:
        if "prompt" not in meta:
            raise UsageError("no prompt: give --prompt TEXT, --prompts-file FILE or --from-png FILE")
        items = [Item({"prompt": meta["prompt"]}, f"--from-png {from_png}", True)]

    # settings shared by every image are usage errors, found before reading any model file
    if problem := settings_problem(Settings(prompt="x", **base), max_side=16 * 512):
        raise UsageError(problem)
    for item in items:
        if item.from_cli and not item.fields["prompt"].strip():
            raise UsageError(f"{item.origin}: the prompt is empty")
    if base["cfg_truncation"] > 1:
        log.warning("warning: --cfg-truncation %g is above 1, the time of a clean image: the same as 1 (CFG on "
                    "every step)", base["cfg_truncation"])
    probe = Path(output.format(index=0, seed=0, prompt="p")).expanduser()
    if problem := output_problem(probe):
        raise UsageError(problem)

    from .hub import resolve_model_path  # an org/name is looked up in the local Hugging Face cache only

    model = resolve_model_path(None if named is None else str(named.expanduser()), DEFAULT_MODEL)
    if files and any(v is not None for v in files.values()):
        tcfg, vcfg, sources = check_single_files(model, named is not None, files)
    else:
        sources = None
        try:
            require_folder(model)
            from .check import require_layout

            require_layout(model)
        except MissingFileError as e:
            stored = f" (the model stored in {from_png}; --model-path DIR gives another)" if stored_model else ""
            raise UsageError(missing_hint(e, model) + stored) from None
        from .scheduler import SchedulerConfig
        from .transformer import TransformerConfig
        from .vae import VAEConfig
        from .weights import read_config

        tcfg = read_config(TransformerConfig.from_json, model / "transformer" / "config.json")
        vcfg = read_config(VAEConfig.from_json, model / "vae" / "config.json")
        read_config(SchedulerConfig.from_json, model / "scheduler" / "scheduler_config.json")
    max_side = tcfg.max_image_side * vcfg.scale_factor
    guidance_given = given["guidance_scale"] is not None or "guidance_scale" in settings_from(meta)
    size_given = (given["width"] is not None or "width" in meta, given["height"] is not None or "height" in meta)
    result = plan_jobs(base, items, output, num_images, str(model), max_side, guidance_given, size_given)
    cli_errors = [m for item, m in result.errors if item.from_cli]
    if cli_errors:
        raise UsageError(cli_errors[0])
    if any(j.settings.control_image for j in result.jobs):
        from .controlnet import controlnet_problem

        if problem := controlnet_problem(Path(base["controlnet"]), tcfg, any(j.settings.mask for j in result.jobs)):
            raise UsageError(problem)
    if sources is None:
        from .modelfiles import ModelFiles

        sources = ModelFiles(model)
    errors = sorted(file_errors + result.errors, key=lambda e: e[0].line)  # in line order
    jobs, lora_errors = checked_loras(result.jobs, sources, base["loras"])
    return jobs, [m for _, m in errors] + lora_errors, sources, random_seed


def checked_loras(jobs: list[Job], sources: "ModelFiles", given: tuple) -> tuple[list[Job], list[str]]:
    """The jobs with each LoRA's sha256 filled in, after checking every LoRA file fits the model (from headers only,
    before any weights load) and that files named by --from-png are unchanged. A bad file of `given` (--lora or
    --from-png) is a usage error; one named only by prompts-file lines skips those lines (returned messages)."""
    from dataclasses import replace

    refs = {r.path: r for j in jobs for r in j.settings.loras}
    if not refs:
        return jobs, []
    from .lora import LoraError, model_shapes, read_lora, sha256

    shapes = model_shapes(sources)
    sums, problems = {}, {}
    for path, ref in refs.items():
        try:
            if ref.sha256 and not Path(path).is_file():
                raise LoraError(f"--from-png: the image was made with LoRA file {path}, which is not there any more")
            lora = read_lora(Path(path), shapes)
            sums[path] = sha256(Path(path))
            if ref.sha256 and ref.sha256 != sums[path]:
                raise LoraError(f"--from-png: LoRA file {path} changed since the image was made (sha256 "
                                f"{sums[path][:12]}..., the image says {ref.sha256[:12]}...)")
        except LoraError as e:
            if path in {r.path for r in given}:
                raise UsageError(str(e)) from None
            problems[path] = str(e)
            continue
        if lora.unmatched:
            log.warning("LoRA file %s: %d key(s) match nothing in Z-Image and are ignored: %s%s", Path(path).name,
                        len(lora.unmatched), ", ".join(lora.unmatched[:3]), ", ..." if len(lora.unmatched) > 3 else "")
    ok = [j for j in jobs if not any(r.path in problems for r in j.settings.loras)]
    skipped = list(dict.fromkeys(f"{j.origin}: {problems[r.path]}" for j in jobs for r in j.settings.loras
                                 if r.path in problems))
    return [replace(j, settings=replace(j.settings, loras=tuple(replace(r, sha256=sums[r.path])
                                                               for r in j.settings.loras))) for j in ok], skipped


def check_single_files(model: Path, explicit: bool, files: dict):
    """The transformer and VAE configs and the ModelFiles of a run given single files (or a tokenizer folder),
    after checking that every part is there and every file's names and shapes fit."""
    from .modelfiles import checked, require_sources, scheduler_config, sources

    run = sources(model, explicit, **{k: v.expanduser() if v is not None else None for k, v in files.items()})
    require_sources(run)
    tcfg, vcfg = checked(run, "transformer").config, checked(run, "vae").config
    if run.text_encoder:
        checked(run, "text_encoder")
    scheduler_config(run)
    return tcfg, vcfg, run
