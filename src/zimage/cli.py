"""The `zimage` command: generate, check, make-tiny."""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from .inputs import recorded_inputs_problem, steps_run
from .jobs import (Item, Job, UsageError, output_problem, plan_jobs, read_prompts_file, settings_from,
                   settings_problem, Settings)
from .weights import DOWNLOAD_HINT, MissingFileError, WeightsError, read_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Generate images with Alibaba's Z-Image models (Z-Image-Turbo) on CUDA, Apple MPS or CPU.")
log = logging.getLogger("zimage")

DEFAULT_MODEL = Path("weights/Z-Image-Turbo")
DEFAULT_OUTPUT = "z_image_output.png"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
VAE_TILE = 64  # latent pixels (512 px) per tile with --vae-tiling


def err(message: str) -> None:
    typer.echo(message, err=True)


def setup_logging(quiet: bool, debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    log.propagate = False


@contextmanager
def reported(debug: bool) -> Iterator[None]:
    """Turn failures into one line on stderr and an exit code; `--debug` re-raises for the full traceback."""
    import torch

    from .images import NonFiniteImage
    from .pipeline import OutOfMemory
    from .scheduler import NonFiniteLatents

    try:
        yield
    except typer.Exit:
        raise
    except UsageError as e:
        fail(debug, f"error: {e}", EXIT_USAGE)
    except MissingFileError as e:
        fail(debug, f"error: {e}. Download the model with: {DOWNLOAD_HINT}", EXIT_USAGE)
    except WeightsError as e:
        fail(debug, f"error: {e}", EXIT_FAILED)
    except (NonFiniteLatents, NonFiniteImage) as e:
        fail(debug, f"error: {e}; no image was written for that batch. The dtype overflowed: try --dtype "
                    "bfloat16 or float32", EXIT_FAILED)
    except (OutOfMemory, torch.OutOfMemoryError) as e:
        fail(debug, f"error: {e if isinstance(e, OutOfMemory) else 'out of GPU memory'}. Lower the memory needed "
                    "with --offload model or --offload sequential, a smaller --width/--height, --batch-size 1, "
                    "or --vae-tiling", EXIT_FAILED)
    except Exception as e:  # anything unforeseen still gets one line; --debug shows where it came from
        fail(debug, f"error: {type(e).__name__}: {e} (run again with --debug for the full traceback)", EXIT_FAILED)


def fail(debug: bool, message: str, code: int) -> None:
    if debug:
        traceback.print_exc()
    err(message)
    raise typer.Exit(code)


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


@app.command()
def generate(
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="Prompt text; give it several times for several prompts."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file", help="File of prompts: one a line (# comments), or .jsonl objects; - reads stdin."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="What to steer away from (turns CFG on with scale 5 unless --guidance-scale says otherwise). [default: \"\"]"),
    model_path: Optional[Path] = typer.Option(None, "--model-path", help=f"Checkpoint folder in the published layout. [default: {DEFAULT_MODEL}]"),
    width: Optional[int] = typer.Option(None, "--width", help="Image width in pixels, a multiple of 16. [default: 1024]"),
    height: Optional[int] = typer.Option(None, "--height", help="Image height in pixels, a multiple of 16. [default: 1024]"),
    num_steps: Optional[int] = typer.Option(None, "--num-steps", help="Denoising steps (forward passes). [default: 8]"),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="CFG scale; CFG runs when > 0. [default: 0, or 5.0 with a negative prompt]"),
    cfg_normalization: Optional[float] = typer.Option(None, "--cfg-normalization", help="Cap the guided prediction's norm at this multiple of the positive one; 0 = off. [default: 0]"),
    cfg_truncation: Optional[float] = typer.Option(None, "--cfg-truncation", help="No CFG on steps whose time (0 noise .. 1 clean) exceeds this. [default: 1.0]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the first image; image k of a run uses seed + k. [default: random, printed]"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output file or template with {index}, {seed}, {prompt}; .png, .jpg or .webp. [default: z_image_output.png]"),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images per prompt."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Images of the same size denoised together in one forward pass."),
    from_png: Optional[Path] = typer.Option(None, "--from-png", help="Re-run the settings stored in a PNG made by zimage; flags given here override them."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per finished image on stdout, and nothing else there."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or progress messages."),
    cpu: bool = typer.Option(False, "--cpu", help="Force the CPU."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps. [default: auto: cuda, then mps, then cpu]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto, bfloat16 or float32. [default: bfloat16 on GPUs, float32 on CPU]"),
    force: bool = typer.Option(False, "--force", help="Allow --dtype float16 although it overflows in this model."),
    offload: Optional[str] = typer.Option(None, "--offload", help="none, model or sequential. [default: none when everything fits, else chosen and said]"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the transformer blocks (slow first step, faster after)."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Decode in overlapping tiles so large images fit in little memory."),
    vae_dtype: Optional[str] = typer.Option(None, "--vae-dtype", help="auto, float32 or bfloat16 for the VAE decode. [default: auto: float32, as the VAE config asks]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    init_image: Optional[Path] = typer.Option(None, "--init-image", rich_help_panel="Image", help="Start from this picture (image-to-image); the size defaults to its own, rounded down to multiples of 16."),
    strength: Optional[float] = typer.Option(None, "--strength", rich_help_panel="Image", help="How much of --init-image to repaint, in (0, 1]; runs the last strength x steps. [default: 0.6; 1.0 with --mask]"),
    mask: Optional[Path] = typer.Option(None, "--mask", rich_help_panel="Image", help="Inpainting: repaint the white part of --init-image, keep the black (any picture; made grey and cut at 50%)."),
    control_image: Optional[Path] = typer.Option(None, "--control-image", rich_help_panel="Image", help="ControlNet condition used as given (edge, depth or pose map...); needs --controlnet."),
    control_scale: Optional[float] = typer.Option(None, "--control-scale", rich_help_panel="Image", help="Weight of the ControlNet's output. [default: 0.75]"),
    controlnet: Optional[Path] = typer.Option(None, "--controlnet", rich_help_panel="Image", help="Z-Image ControlNet (Z-Image-Turbo-Fun-ControlNet-Union 1.0/2.0/2.1): a diffusers folder, or the one .safetensors file published."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
) -> None:
    """Turn prompts into images."""
    setup_logging(quiet, debug)
    with reported(debug):
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
        if num_images < 1:
            raise UsageError(f"--num-images must be at least 1 (got {num_images})")
        settings = dict(negative_prompt=negative_prompt, width=width, height=height, num_steps=num_steps,
                        guidance_scale=guidance_scale, cfg_normalization=cfg_normalization,
                        cfg_truncation=cfg_truncation, seed=seed,
                        **{k: None if v is None else str(v) for k, v in dict(
                            init_image=init_image, mask=mask, control_image=control_image,
                            controlnet=controlnet).items()}, strength=strength, control_scale=control_scale)
        jobs, skipped, model = plan(prompt, prompts_file, from_png, model_path, output, num_images, overwrite,
                                    settings)
        opts = runtime_options(model, jobs, batch_size, cpu, device, dtype, force, offload, compile_, vae_tiling,
                               vae_dtype, quiet, overwrite)
        for message in skipped:
            err(f"skipped: {message}")
        failed = run_jobs(opts, jobs, batch_size, json_out)
    raise typer.Exit(EXIT_OK if not failed and not skipped else EXIT_FAILED)


def runtime_options(model: Path, jobs: list[Job], batch_size: int, cpu: bool, device: Optional[str],
                    dtype: Optional[str], force: bool, offload: Optional[str], compile_: bool, vae_tiling: bool,
                    vae_dtype: Optional[str], quiet: bool, overwrite: bool):
    """Device, dtype and offload mode for the run, after checking that its largest batch fits in memory."""
    from .devices import choose_offload, estimate, pick_device, pick_dtype
    from .pipeline import OFFLOAD_MODES, Options

    if offload is not None and offload not in OFFLOAD_MODES:
        raise UsageError(f"--offload must be one of {', '.join(OFFLOAD_MODES)} (got '{offload}')")
    dev = pick_device(device, cpu)
    dt = pick_dtype(dtype, dev, force)
    vae_dt = None if vae_dtype in (None, "auto") else pick_dtype(vae_dtype, dev, force)
    if not jobs:
        return Options(model, dev, dt)
    largest = max(jobs, key=lambda j: j.settings.width * j.settings.height).settings
    needs = estimate(model, dt, largest.width, largest.height, min(batch_size, len(jobs)),
                     any(j.settings.guidance_scale > 0 for j in jobs))
    mode, note = choose_offload(needs, dev, dt, offload)
    if note:
        log.info(note)
    log.info("device %s, %s, offload %s; %d image(s)", dev, str(dt).removeprefix("torch."), mode, len(jobs))
    return Options(model, dev, dt, mode, compile_, VAE_TILE if vae_tiling else None, vae_dt, not quiet,
                   overwrite)


def run_jobs(opts, jobs: list[Job], batch_size: int, json_out: bool) -> list[str]:
    """Make the images, reporting each as it is written. Returns the failures; exits 130 on Ctrl-C after
    saying which images were written."""
    from .pipeline import Pipeline

    if not jobs:
        err("nothing to generate")
        return ["nothing to generate"]
    written: list[Job] = []
    failed: list[str] = []

    def on_image(job: Job, seconds: float) -> None:
        written.append(job)
        s = job.settings
        if json_out:
            typer.echo(json.dumps({"path": str(job.output), "prompt": s.prompt, "seed": s.seed, "width": s.width,
                                   "height": s.height, "steps": s.num_steps, "guidance": s.guidance_scale,
                                   "seconds": round(seconds, 3)}))
        if len(jobs) > 1:
            log.info("wrote %s (seed %d, %.1fs)", job.output, s.seed, seconds)

    def on_error(job: Job, message: str) -> None:
        failed.append(message)
        err(f"failed: {job.origin}: {message}")

    def summary(what: str) -> str:
        return f"{what}: {len(written)} of {len(jobs)} image(s) written" + "".join(f"\n  {j.output}" for j in written)

    start = time.perf_counter()
    try:
        Pipeline(opts).run(jobs, batch_size, on_image, on_error)
    except KeyboardInterrupt:
        err(summary("interrupted"))
        raise typer.Exit(EXIT_INTERRUPTED)
    except Exception:
        if written:  # the error is reported by the caller; first say what was saved before it
            err(summary("stopped"))
        raise
    elapsed = time.perf_counter() - start
    if len(jobs) == 1 and written:
        s = written[0].settings
        err(f"Saved {written[0].output} (seed {s.seed}, {steps_run(s)} of {s.num_steps} steps, {elapsed:.1f}s)")
    else:
        err(f"{len(written)} image(s) written, {len(failed)} failed, in {elapsed:.1f}s")
    return failed


def plan(prompt: list[str], prompts_file: Optional[str], from_png: Optional[Path], model_path: Optional[Path],
         output: Optional[str], num_images: int, overwrite: bool, given: dict) -> tuple[list[Job], list[str], Path]:
    """Everything checkable before loading: settings, prompts, outputs, the model folder. Returns the jobs,
    the messages of skipped items, and the model folder. `given` holds the setting flags (None = not given)."""
    from .check import require_layout
    from .scheduler import SchedulerConfig
    from .transformer import TransformerConfig
    from .vae import VAEConfig

    base, meta = base_settings(from_png, **given)
    if problem := recorded_inputs_problem(meta, given):
        raise UsageError(problem)
    if given["seed"] is None and "seed" not in meta:
        base["seed"] = secrets.randbits(32)
        log.info("seed %d (random; pass --seed %d to reproduce)", base["seed"], base["seed"])
    model = model_path or (Path(meta["model_path"]) if "model_path" in meta else DEFAULT_MODEL)
    output = output or DEFAULT_OUTPUT

    items = [Item({"prompt": p}, f"--prompt {i + 1}", True) for i, p in enumerate(prompt)]
    file_errors: list[str] = []
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
    probe = Path(output.format(index=0, seed=0, prompt="p")) if "{" in output else Path(output)
    if problem := output_problem(probe):
        raise UsageError(problem)

    require_layout(model)
    tcfg = read_config(TransformerConfig.from_json, model / "transformer" / "config.json")
    vcfg = read_config(VAEConfig.from_json, model / "vae" / "config.json")
    read_config(SchedulerConfig.from_json, model / "scheduler" / "scheduler_config.json")
    max_side = tcfg.max_image_side * vcfg.scale_factor
    guidance_given = given["guidance_scale"] is not None or "guidance_scale" in settings_from(meta)
    size_given = (given["width"] is not None or "width" in meta, given["height"] is not None or "height" in meta)
    result = plan_jobs(base, items, output, num_images, str(model), max_side, guidance_given, overwrite, size_given)
    cli_errors = [m for item, m in result.errors if item.from_cli]
    if cli_errors:
        raise UsageError(cli_errors[0])
    if any(j.settings.control_image for j in result.jobs):
        from .controlnet import controlnet_problem

        if problem := controlnet_problem(Path(base["controlnet"]), tcfg, any(j.settings.mask for j in result.jobs)):
            raise UsageError(problem)
    return result.jobs, file_errors + [m for _, m in result.errors], model


@app.command()
def check(
    model_path: Path = typer.Option(DEFAULT_MODEL, "--model-path", help="Checkpoint folder to verify."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Verify a checkpoint folder: layout, configs, index entries, safetensors headers and tensor shapes."""
    from dataclasses import asdict

    from .check import check_model

    reports = check_model(model_path)
    ok = all(r.ok for r in reports)
    if json_out:
        typer.echo(json.dumps({"ok": ok, "model_path": str(model_path), "components": [asdict(r) for r in reports]}))
    else:
        for r in reports:
            typer.echo(r.line())
        typer.echo("all good" if ok else "problems found")
    raise typer.Exit(EXIT_OK if ok else EXIT_FAILED)


@app.command("make-tiny")
def make_tiny_cmd(
    out: Path = typer.Argument(..., help="Folder to write (replaced only if it is empty or an earlier tiny checkpoint)."),
    shards: int = typer.Option(1, "--shards", help="Write each weight file as this many shards plus an index."),
    dynamic_shift: bool = typer.Option(False, "--dynamic-shift", help="Scheduler with resolution-dependent shift."),
    no_prefix: bool = typer.Option(False, "--no-prefix", help="Text encoder keys without the 'model.' prefix."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
) -> None:
    """Write a small random checkpoint in the published Z-Image layout (for tests and smoke runs)."""
    from .tiny import NotReplaceable, TinySpec, make_tiny

    try:
        make_tiny(out, TinySpec(shards=shards, dynamic_shift=dynamic_shift, te_prefix=not no_prefix, seed=seed))
    except NotReplaceable as e:
        err(f"error: {e}")
        raise typer.Exit(EXIT_USAGE)
    except OSError as e:
        err(f"error: cannot write {out}: {e.strerror or e}")
        raise typer.Exit(EXIT_FAILED)
    typer.echo(f"wrote a tiny random checkpoint to {out}")
