"""The `zimage` command: generate, check, make-tiny."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from .clihelp import EXIT_INTERRUPTED, Command, Group
from .errors import MissingFileError, NonFiniteImage, NonFiniteLatents, OutOfMemory, UsageError, WeightsError
from .jobs import Job, Settings, parse_lora
from .layout import DEFAULT_MODEL
from .published import REPO_ID
from .planning import plan
from .report import report_group, summarize
from .runner import run_jobs

# torch, transformers, numpy and PIL are imported inside the functions that need them: `--help` and usage errors
# stay fast because they never load them.
app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="rich",
                  help="Generate images with Alibaba's Z-Image models (Z-Image-Turbo) on CUDA, Apple MPS or CPU.")
log = logging.getLogger("zimage")

DEFAULT_OUTPUT = "z_image_output.png"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
VAE_TILE = 64  # latent pixels (512 px) per tile with --vae-tiling
PROMPTS, IMAGE, SAMPLING, OUTPUT = "Prompts", "Image", "Sampling", "Output"
MODEL_FILES, DEVICE, BATCH = "Model files", "Device and memory", "Batch"


def err(message: str) -> None:
    typer.echo(message, err=True)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("zimage")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"zimage {version()}")
        raise typer.Exit()


@app.callback()
def main_options(
    _version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                  help="Print the version and exit."),
) -> None:
    """Generate images with Alibaba's Z-Image models (Z-Image-Turbo) on CUDA, Apple MPS or CPU."""


def main() -> None:
    """The `zimage` command. Ctrl-C before a command takes over (while Python imports) exits 130 on one line."""
    try:
        app()
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(EXIT_INTERRUPTED)


def setup_logging(quiet: bool, debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    log.propagate = False


@contextmanager
def reported(debug: bool) -> Iterator[None]:
    """Turn failures into one line on stderr and an exit code; `--debug` re-raises for the full traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        fail(debug, "interrupted before any image was written", EXIT_INTERRUPTED)
    except UsageError as e:
        fail(debug, f"error: {e}", EXIT_USAGE)
    except MissingFileError as e:
        fail(debug, f"error: {e}", EXIT_USAGE)
    except WeightsError as e:
        fail(debug, f"error: {e}", EXIT_FAILED)
    except (NonFiniteLatents, NonFiniteImage) as e:
        fail(debug, f"error: {e}; no image was written for that batch. The dtype overflowed: try --dtype "
                    "bfloat16 or float32", EXIT_FAILED)
    except Exception as e:
        torch = sys.modules.get("torch")  # a torch error can only come from a torch that was imported
        if isinstance(e, OutOfMemory) or (torch is not None and isinstance(e, torch.OutOfMemoryError)):
            fail(debug, f"error: {e if isinstance(e, OutOfMemory) else 'out of GPU memory'}. Lower the memory "
                        "needed with --offload model or --offload sequential, a smaller --width/--height, "
                        "--batch-size 1, or --vae-tiling", EXIT_FAILED)
        # anything unforeseen still gets one line; --debug shows where it came from
        fail(debug, f"error: {type(e).__name__}: {e} (run again with --debug for the full traceback)", EXIT_FAILED)


def fail(debug: bool, message: str, code: int) -> None:
    if debug:
        traceback.print_exc()
    err(message)
    raise typer.Exit(code)


def given(ctx: typer.Context, **values):
    """The values of the flags typed on the command line; None for those left at their defaults (so that settings
    stored with --from-png apply to them)."""
    return {k: v if ctx.get_parameter_source(k).name not in ("DEFAULT", "DEFAULT_MAP") else None
            for k, v in values.items()}


@app.command(cls=Command)
def generate(
    ctx: typer.Context,
    prompt: List[str] = typer.Option([], "--prompt", "-p", metavar="TEXT", show_default=False,
                                     rich_help_panel=PROMPTS,
                                     help="Prompt text; give it several times for several prompts."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file", metavar="FILE", rich_help_panel=PROMPTS,
                                               help="File of prompts: one a line (# comments), or .jsonl objects; "
                                                    "- reads stdin."),
    negative_prompt: str = typer.Option(Settings.negative_prompt, "--negative-prompt", metavar="TEXT",
                                        show_default=False, rich_help_panel=PROMPTS,
                                        help="What to steer away from (turns CFG on with scale 5 unless "
                                             "--guidance-scale says otherwise)."),
    from_png: Optional[Path] = typer.Option(None, "--from-png", metavar="FILE", rich_help_panel=PROMPTS,
                                            help="Re-run the prompt and settings stored in a PNG made by zimage; "
                                                 "flags given here override them."),
    width: int = typer.Option(Settings.width, "--width", rich_help_panel=IMAGE,
                              help="Image width in pixels, a multiple of 16."),
    height: int = typer.Option(Settings.height, "--height", rich_help_panel=IMAGE,
                               help="Image height in pixels, a multiple of 16."),
    seed: Optional[int] = typer.Option(None, "--seed", show_default="random, printed", rich_help_panel=IMAGE,
                                       help="Seed of the first image; image k of a run uses seed + k."),
    init_image: Optional[Path] = typer.Option(None, "--init-image", metavar="FILE", rich_help_panel=IMAGE,
                                              help="Start from this picture (image-to-image); the size defaults to "
                                                   "its own, rounded down to multiples of 16."),
    strength: Optional[float] = typer.Option(None, "--strength", show_default="0.6; 1.0 with --mask",
                                             rich_help_panel=IMAGE,
                                             help="How much of --init-image to repaint, in (0, 1]; runs the last "
                                                  "strength x steps."),
    mask: Optional[Path] = typer.Option(None, "--mask", metavar="FILE", rich_help_panel=IMAGE,
                                        help="Inpainting: repaint the white part of --init-image, keep the black "
                                             "(any picture; made grey and cut at 50%)."),
    control_image: Optional[Path] = typer.Option(None, "--control-image", metavar="FILE", rich_help_panel=IMAGE,
                                                 help="ControlNet condition used as given (edge, depth or pose "
                                                      "map...); needs --controlnet."),
    control_scale: float = typer.Option(Settings.control_scale, "--control-scale", rich_help_panel=IMAGE,
                                        help="Weight of the ControlNet's residuals."),
    controlnet: Optional[Path] = typer.Option(None, "--controlnet", metavar="PATH", rich_help_panel=IMAGE,
                                              help="Z-Image ControlNet (Z-Image-Turbo-Fun-ControlNet-Union "
                                                   "1.0/2.0/2.1): a diffusers folder, or the one .safetensors file "
                                                   "published."),
    num_steps: int = typer.Option(Settings.num_steps, "--num-steps", rich_help_panel=SAMPLING,
                                  help="Denoising steps (forward passes)."),
    guidance_scale: float = typer.Option(Settings.guidance_scale, "--guidance-scale", rich_help_panel=SAMPLING,
                                         show_default="0, or 5.0 with --negative-prompt",
                                         help="CFG scale; CFG runs when > 0."),
    cfg_normalization: float = typer.Option(Settings.cfg_normalization, "--cfg-normalization",
                                            rich_help_panel=SAMPLING,
                                            help="Cap the guided prediction's norm at this multiple of the "
                                                 "positive one; 0 = off."),
    cfg_truncation: float = typer.Option(Settings.cfg_truncation, "--cfg-truncation", rich_help_panel=SAMPLING,
                                         help="No CFG on steps whose time (0 noise .. 1 clean) exceeds this; "
                                              "1 = CFG on every step."),
    output: str = typer.Option(DEFAULT_OUTPUT, "--output", "-o", rich_help_panel=OUTPUT,
                               help="Output file or template with {index}, {seed}, {prompt}; .png, .jpg or .webp."),
    overwrite: bool = typer.Option(False, "--overwrite", rich_help_panel=OUTPUT,
                                   help="Replace existing output files."),
    json_out: bool = typer.Option(False, "--json", rich_help_panel=OUTPUT,
                                  help="Print one JSON object per finished image on stdout, and nothing else there."),
    quiet: bool = typer.Option(False, "--quiet", "-q", rich_help_panel=OUTPUT,
                               help="Only errors and warnings on stderr (no progress, no summary); nothing on "
                                    "stdout but --json records."),
    debug: bool = typer.Option(False, "--debug", rich_help_panel=OUTPUT, help="Show full tracebacks."),
    model_path: Path = typer.Option(DEFAULT_MODEL, "--model-path", metavar="DIR", rich_help_panel=MODEL_FILES,
                                    help="Checkpoint folder in the published layout, or org/name of a model in the "
                                         f"Hugging Face cache (by default, {REPO_ID} there when the folder is absent)."),
    transformer: Optional[Path] = typer.Option(None, "--transformer", metavar="FILE", rich_help_panel=MODEL_FILES,
                                               help="Transformer from one safetensors file (original/ComfyUI or "
                                                    "diffusers names)."),
    text_encoder: Optional[Path] = typer.Option(None, "--text-encoder", metavar="FILE", rich_help_panel=MODEL_FILES,
                                                help="Qwen3 text encoder from one safetensors file (as ComfyUI "
                                                     "ships it)."),
    vae: Optional[Path] = typer.Option(None, "--vae", metavar="FILE", rich_help_panel=MODEL_FILES,
                                       help="VAE from one safetensors file (Flux ae.safetensors or diffusers names)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", metavar="DIR", rich_help_panel=MODEL_FILES,
                                             show_default="the model folder's tokenizer/",
                                             help="Tokenizer folder, or org/name in the Hugging Face cache."),
    lora: List[str] = typer.Option([], "--lora", metavar="FILE[:SCALE]", show_default=False,
                                   rich_help_panel=MODEL_FILES,
                                   help="LoRA (.safetensors from any common trainer) merged into the model, scale 1.0 "
                                        "unless given; repeat to combine several."),
    cpu: bool = typer.Option(False, "--cpu", rich_help_panel=DEVICE, help="Use the CPU (same as --device cpu)."),
    device: str = typer.Option("auto", "--device", rich_help_panel=DEVICE,
                               help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", rich_help_panel=DEVICE,
                              help="auto (bfloat16 on GPUs; on the CPU bfloat16 where it computes it natively "
                                   "or float32 would not fit, else float32, said at start), bfloat16 or float32."),
    force: bool = typer.Option(False, "--force", rich_help_panel=DEVICE,
                               help="Allow --dtype float16 although it overflows in this model."),
    offload: Optional[str] = typer.Option(None, "--offload", show_default="none when everything fits, else chosen",
                                          rich_help_panel=DEVICE,
                                          help="none, model or sequential: keep weights on the CPU and move each "
                                               "model (or transformer block) to the GPU only while it runs."),
    compile_: bool = typer.Option(False, "--compile", rich_help_panel=DEVICE,
                                  help="torch.compile the transformer blocks (slow first step, faster after)."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", rich_help_panel=DEVICE,
                                    help="Decode in overlapping tiles so large images fit in little memory."),
    vae_dtype: str = typer.Option("auto", "--vae-dtype", rich_help_panel=DEVICE,
                                  help="auto (float32, as the VAE config asks), float32 or bfloat16 for the decode."),
    num_images: int = typer.Option(1, "--num-images", "-n", rich_help_panel=BATCH, help="Images per prompt."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", rich_help_panel=BATCH,
                                   help="Images of the same size denoised together in one forward pass."),
    skip_existing: bool = typer.Option(False, "--skip-existing", rich_help_panel=BATCH,
                                       help="Keep outputs already made with the same settings and make the rest: "
                                            "run a stopped batch again to finish it."),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="K/N", rich_help_panel=BATCH,
                                        help="Make only share K of N of the run (K from 0), e.g. one task of a "
                                             "SLURM array; N runs with K=0..N-1 make all of it."),
    quantize: str = typer.Option("none", "--quantize", rich_help_panel=DEVICE,
                                 help="none, int8 (any device) or fp8 (CUDA capability 8.9+): store the "
                                      "transformer's linear weights quantized, made tensor by tensor while loading. "
                                      "Refused for a file already quantized (GGUF, ComfyUI fp8)."),
    quantize_text_encoder: str = typer.Option("none", "--quantize-text-encoder", rich_help_panel=DEVICE,
                                              help="none, int8 or fp8: the same for the text encoder."),
) -> None:
    """Turn prompts into images."""
    from . import dist, resume

    setup_logging(quiet, debug)
    with reported(debug):
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
        if num_images < 1:
            raise UsageError(f"--num-images must be at least 1 (got {num_images})")
        part = dist.current(shard)
        quiet = quiet or part.group_rank > 0  # only rank 0 of a torchrun group reports
        setup_logging(quiet, debug)
        if part.world > 1 and seed is None and from_png is None:
            raise UsageError("give --seed when the run is split (--shard or torchrun), so that every process "
                             "plans the same images")
        if part.launched and prompts_file == "-":
            raise UsageError("torchrun processes cannot share stdin: give --prompts-file a file")
        settings = given(ctx, negative_prompt=negative_prompt, width=width, height=height, num_steps=num_steps,
                         guidance_scale=guidance_scale, cfg_normalization=cfg_normalization,
                         cfg_truncation=cfg_truncation, seed=seed, strength=strength,
                         control_scale=control_scale,
                         **{k: None if v is None else str(v.expanduser()) for k, v in dict(
                             init_image=init_image, mask=mask, control_image=control_image,
                             controlnet=controlnet).items()})
        try:
            settings["loras"] = tuple(parse_lora(x) for x in lora) or None
        except ValueError as e:
            raise UsageError(str(e)) from None
        jobs, skipped, model, random_seed = plan(prompt, prompts_file, from_png, given(ctx, model_path=model_path)
                                                 ["model_path"], output, num_images, settings,
                                                 dict(transformer=transformer, text_encoder=text_encoder, vae=vae,
                                                      tokenizer=tokenizer))
        mine = resume.triage(dist.share(batches_of(jobs, batch_size), part), overwrite, skip_existing)
        if blocked := [m for j, m in mine.blocked if j.origin.startswith("--")]:
            raise UsageError(blocked[0])  # an image asked for on the command line is not silently left out
        opts = runtime_options(model, mine.todo, batch_size, cpu, device, dtype, force, offload, compile_,
                               vae_tiling, vae_dtype, quiet, overwrite, quantize, quantize_text_encoder)
        group = dist.Group(part, opts.device) if part.launched else None
        if group and not group.agree(dist.digest(jobs)):
            raise UsageError("the torchrun processes planned different runs: start each with the same command, "
                             "files and --seed")
        failures = (skipped if part.rank == 0 else []) + [m for _, m in mine.blocked]  # bad lines: said once
        for message in failures:
            err(f"skipped: {message}")
        if random_seed is not None and mine.todo:
            log.info("seed %d (random; pass --seed %d to reproduce)", random_seed, random_seed)
        resume.clean(mine.todo + mine.done, mine.stale)
    start = time.perf_counter()
    code = EXIT_OK
    records: list[dict] = []
    try:
        with reported(debug):
            records, failed = run_jobs(opts, mine.todo, mine.done, batch_size, json_out and group is None)
            failures += failed
    except typer.Exit as e:
        if group is None or e.exit_code == EXIT_INTERRUPTED:
            raise
        code = e.exit_code  # the error is said; rank 0 still reports this process's images with the others'
    elapsed = time.perf_counter() - start
    if group is None:
        if not mine.todo and not mine.done and part.world == 1:  # every image was refused
            err("nothing to generate")
            raise typer.Exit(EXIT_FAILED)
        summarize(records, len(failures), elapsed)
        raise typer.Exit(EXIT_OK if not failures else EXIT_FAILED)
    results = group.gather({"records": records, "failed": len(failures), "code": code})
    if results is not None:
        code = report_group(results, json_out, elapsed)
    group.close()
    raise typer.Exit(code if code else EXIT_OK if not failures else EXIT_FAILED)


def batches_of(jobs: list[Job], size: int) -> list[list[Job]]:
    from .pipeline import batches

    return batches(jobs, size)


def runtime_options(model, jobs: list[Job], batch_size: int, cpu: bool, device: str,
                    dtype: Optional[str], force: bool, offload: Optional[str], compile_: bool, vae_tiling: bool,
                    vae_dtype: Optional[str], quiet: bool, overwrite: bool, quantize: str = "none",
                    quantize_text_encoder: str = "none"):
    """Device, dtype and offload mode for the run, after checking that its largest batch fits in memory. `model`
    is the run's ModelFiles."""
    import torch

    from .devices import choose_offload, cpu_dtype, estimate, pick_device, pick_dtype, quantize_problem
    from .dist import current as current_shard, local_device
    from .pipeline import OFFLOAD_MODES, Options

    if offload is not None and offload not in OFFLOAD_MODES:
        raise UsageError(f"--offload must be one of {', '.join(OFFLOAD_MODES)} (got '{offload}')")
    if cpu and device not in ("auto", "cpu"):
        raise UsageError(f"--cpu and --device {device} conflict; give one of them")
    dev = local_device(pick_device(device, cpu), current_shard())
    from .quant import stored_quantized

    for flag, value, name in (("--quantize", quantize, "transformer"),
                              ("--quantize-text-encoder", quantize_text_encoder, "text_encoder")):
        if problem := quantize_problem(value, dev):
            raise UsageError(f"{flag} {value}: {problem}")
        if value != "none" and (stored := stored_quantized(model, name)):  # quantizing it again only adds error
            raise UsageError(f"{flag} {value}: the {name.replace('_', ' ')} file {stored[0].name} is already "
                             f"quantized ({stored[1]}); leave out {flag}")
    if offload in ("model", "sequential") and dev.type != "cuda":
        log.warning("warning: --offload %s saves no memory on %s: the weights already live in the memory it computes "
                    "from, so offloading only adds copies (same image, slower)", offload, dev.type)
    dt = pick_dtype(dtype, dev, force)
    vae_dt = None if vae_dtype in (None, "auto") else pick_dtype(vae_dtype, dev, force)
    if not jobs:
        return Options(model.folder, dev, dt, files=model, quantize=quantize,
                       quantize_text_encoder=quantize_text_encoder)
    largest = max(jobs, key=lambda j: j.settings.width * j.settings.height).settings
    cfg_on = any(j.settings.guidance_scale > 0 for j in jobs)
    sizes = (largest.width, largest.height, min(batch_size, len(jobs)), cfg_on, VAE_TILE if vae_tiling else None,
             quantize, quantize_text_encoder)
    if dev.type == "cpu" and dtype in (None, "auto"):
        dt, why = cpu_dtype(estimate(model, torch.float32, *sizes).peak("none"))
        log.info("dtype %s: %s", str(dt).removeprefix("torch."), why)
    needs = estimate(model, dt, *sizes)
    mode, note = choose_offload(needs, dev, dt, offload)
    if note:
        log.info(note)
    log.info("device %s, %s, offload %s; %d image(s)", dev, str(dt).removeprefix("torch."), mode, len(jobs))
    return Options(model.folder, dev, dt, mode, compile_, VAE_TILE if vae_tiling else None, vae_dt, not quiet,
                   overwrite, files=model, quantize=quantize, quantize_text_encoder=quantize_text_encoder)


@app.command(cls=Command)
def check(
    ctx: typer.Context,
    folder: Path = typer.Argument(DEFAULT_MODEL, metavar="DIR", help="Checkpoint folder to verify."),
    model_path: Optional[Path] = typer.Option(None, "--model-path", metavar="DIR", show_default=False,
                                              help="The same as DIR (the spelling `generate` uses)."),
    transformer: Optional[Path] = typer.Option(None, "--transformer", metavar="FILE", rich_help_panel=MODEL_FILES,
                                               help="Check this single transformer file instead of the folder's."),
    text_encoder: Optional[Path] = typer.Option(None, "--text-encoder", metavar="FILE", rich_help_panel=MODEL_FILES,
                                                help="Check this single text encoder file instead of the folder's."),
    vae: Optional[Path] = typer.Option(None, "--vae", metavar="FILE", rich_help_panel=MODEL_FILES,
                                       help="Check this single VAE file instead of the folder's."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", metavar="DIR", rich_help_panel=MODEL_FILES,
                                             help="Check this tokenizer folder instead of the folder's."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Verify a checkpoint folder (or org/name in the Hugging Face cache) and single files: layout, configs, index
    entries, safetensors headers, tensor names and shapes."""
    from dataclasses import asdict

    from .check import check_sources
    from .hub import resolve_model_path
    from .modelfiles import sources

    folder_given = given(ctx, folder=folder)["folder"]
    if folder_given and model_path and folder_given != model_path:
        err(f"error: two folders given ({folder} and --model-path {model_path}); give one")
        raise typer.Exit(EXIT_USAGE)
    named = model_path or folder_given
    try:
        model_path = resolve_model_path(None if named is None else str(named.expanduser()), DEFAULT_MODEL)
        files = sources(model_path, named is not None, transformer, text_encoder, vae, tokenizer)
    except (UsageError, MissingFileError) as e:
        err(f"error: {e}")
        raise typer.Exit(EXIT_USAGE)
    reports = check_sources(files)
    ok = all(r.ok for r in reports)
    if json_out:
        typer.echo(json.dumps({"ok": ok, "model_path": str(model_path), "components": [asdict(r) for r in reports]}))
    else:
        for r in reports:
            typer.echo(r.line())
        typer.echo("all good" if ok else "problems found")
    raise typer.Exit(EXIT_OK if ok else EXIT_FAILED)


@app.command("make-tiny", cls=Command)
def make_tiny_cmd(
    out: Path = typer.Argument(..., metavar="DIR", help="Folder to write (replaced only if it is empty or an earlier tiny checkpoint)."),
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
