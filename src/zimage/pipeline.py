"""Prompt -> caption features -> latents -> image -> file, with each model resident only while it is needed."""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .errors import OutOfMemory
from .images import save_image, to_pil
from .jobs import Job
from .lora import LoraSet, model_shapes, read_lora
from .devices import trim_host, tune_allocator
from .modelfiles import ModelFiles, component, scheduler_config
from .compiling import compile_blocks, uncompile
from .offload import BlockStreamer, empty_cache
from .picture import blender, control_latents, latent_mask, start_latents
from .scheduler import Guidance, denoise, first_step, get_noise, get_sigmas, model_times
from .text_encoder import TextEncoder
from .transformer import ZImageTransformer
from .vae import AutoencoderKL, VAEConfig
from .weights import Patch, expected_shapes, load_pieces, match_pieces

log = logging.getLogger("zimage")

OFFLOAD_MODES = ("none", "model", "sequential")


@contextmanager
def interrupts_held():
    """Hold SIGINT until the block ends, then raise KeyboardInterrupt if one came. A no-op off the main thread
    or when someone else handles SIGINT."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


@dataclass(frozen=True)
class Options:
    model_path: Path
    device: torch.device
    dtype: torch.dtype
    offload: str = "none"
    compile: bool = False
    vae_tile: int | None = None  # tile side in latent pixels; None decodes whole images
    vae_dtype: torch.dtype | None = None  # None: float32 when the VAE config asks to upcast, else `dtype`
    progress: bool = True
    overwrite: bool = False
    files: ModelFiles | None = None  # where each component comes from; None: everything from model_path
    quantize: str = "none"  # transformer weights: none, int8 or fp8 (quant.QUANTIZE)
    quantize_text_encoder: str = "none"

    @property
    def sources(self) -> ModelFiles:
        return self.files or ModelFiles(folder=self.model_path)


@dataclass
class Timings:
    """Seconds spent per phase, for reporting and benchmarks."""

    load: float = 0.0
    encode: float = 0.0
    steps: list[float] = field(default_factory=list)
    decode: float = 0.0
    pictures: float = 0.0  # VAE encoding of init, mask-area and control images


def load_transformer(source: ModelFiles | Path, device: torch.device, dtype: torch.dtype,
                     quantize: str = "none", patch: Patch | None = None) -> ZImageTransformer:
    """The transformer from a checkpoint folder or the ModelFiles of a run (a single file in any layout, a GGUF
    file kept quantized), its linear weights quantized to `quantize` (int8, fp8) while loading unless none;
    `patch` edits weights as they load, before any quantization (see weights.read_pieces)."""
    comp = component(ModelFiles.of(source), "transformer")
    with torch.device("meta"):
        model = ZImageTransformer(comp.config)
    match_pieces(comp.header, expected_shapes(model), comp.pieces, comp.configured_by, comp.where)
    from .quant import load_weights_of

    # int8 activations for the transformer only: it is where the time goes (the text encoder runs once per prompt)
    return load_weights_of(model, comp, dtype, device, quantize, patch, "transformer", int8_activations=True)


def load_vae(source: ModelFiles | Path, device: torch.device, dtype: torch.dtype | None = None,
             run_dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The VAE in `dtype`; by default in float32 when its config's force_upcast asks (the published one does),
    else in the run's dtype."""
    comp = component(ModelFiles.of(source), "vae")
    cfg: VAEConfig = comp.config
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    match_pieces(comp.header, expected_shapes(model), comp.pieces, comp.configured_by, comp.where)
    dtype = dtype or (torch.float32 if cfg.force_upcast else run_dtype)
    model = load_pieces(model, comp.header, comp.pieces, dtype, device)
    if device.type != "mps":
        model.to(memory_format=torch.channels_last)  # oneDNN and cuDNN convolutions run faster on NHWC
    return model


def free_memory(released: list[weakref.ref], *devices: torch.device) -> None:
    """Give the memory of modules whose references were just dropped back to the system and the devices.

    Reference counting frees them at once; a full garbage collection (0.2 s) runs only when one of them is
    still alive, held by a reference cycle (block-streaming hooks make one).
    """
    if any(ref() is not None for ref in released):
        gc.collect()
    trim_host()
    for d in set(devices):
        empty_cache(d)


def batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Group jobs that can share a forward pass (same size, steps and guidance), keeping run order within a group."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        s = job.settings
        key = (s.width, s.height, s.num_steps, s.guidance_scale, s.cfg_normalization, s.cfg_truncation,
               s.init_image is None, s.strength, s.mask is None, s.control_image is None, s.control_scale)
        groups.setdefault(key, []).append(job)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


def lora_groups(jobs: list[Job], files: ModelFiles) -> dict[tuple, tuple[LoraSet | None, list[Job]]]:
    """Jobs grouped by their LoRA set (first-seen order), each set read once."""
    groups: dict[tuple, tuple[LoraSet | None, list[Job]]] = {}
    shapes = None
    for job in jobs:
        refs = job.settings.loras
        if refs not in groups:
            loras = None
            if refs:
                shapes = shapes or model_shapes(files)
                loras = LoraSet([(read_lora(Path(r.path), shapes), r.scale) for r in refs])
            groups[refs] = (loras, [])
        groups[refs][1].append(job)
    return groups


def te_refs(refs: tuple, loras: LoraSet | None) -> tuple:
    """The part of a LoRA set that changes caption features: all of it when it touches the text encoder, else none."""
    return refs if loras is not None and loras.touches("text_encoder") else ()


class Pipeline:
    """Runs jobs with the models of one checkpoint: encode every prompt, free the text encoder, then denoise and
    decode batch by batch, writing each image as soon as it is decoded."""

    def __init__(self, opts: Options):
        tune_allocator()
        self.opts = opts
        self.scheduler = scheduler_config(opts.sources)
        self.timings = Timings()
        self.transformer: ZImageTransformer | None = None
        self.vae: AutoencoderKL | None = None
        self.streamer: BlockStreamer | None = None
        self.controlnet = None  # loaded with the transformer when a job has a control image
        self.controlnet_path: str | None = None
        self.controlnet_streamer: BlockStreamer | None = None

    @property
    def compute_device(self) -> torch.device:
        return self.opts.device

    @property
    def storage_device(self) -> torch.device:
        """Where weights rest between uses: the CPU when offloading, else the compute device."""
        return torch.device("cpu") if self.opts.offload != "none" else self.opts.device

    def encode(self, prompts: list[str], loras: LoraSet | None = None) -> dict[str, torch.Tensor]:
        """Caption features for each distinct prompt, with the text-encoder part of `loras` merged; the text encoder
        is loaded for this call only."""
        unique = list(dict.fromkeys(prompts))
        t0 = time.perf_counter()
        streamed = self.opts.offload == "sequential"
        encoder = TextEncoder.load(self.opts.sources, self.storage_device if streamed else self.compute_device,
                                   self.opts.dtype, self.opts.quantize_text_encoder,
                                   loras.patch("text_encoder") if loras else None)
        if loras:
            loras.close()
        streamer = BlockStreamer(encoder.model, list(encoder.model.layers), self.compute_device) if streamed else None
        self.timings.load += time.perf_counter() - t0
        log.info("text encoder loaded in %.1fs", time.perf_counter() - t0)
        t0 = time.perf_counter()
        try:
            # one prompt at a time: batched with padding, a prompt's features would depend (in the last bits) on
            # the other prompts of the run, and a resumed or split run would not remake its images exactly
            feats = dict(zip(unique, encoder.encode(unique, batch_size=1)))
        finally:
            if streamer is not None:
                streamer.remove()  # its hooks and the layers form a cycle that would keep the pinned weights
            released = [weakref.ref(encoder.model)]
            del encoder, streamer
            free_memory(released, self.compute_device)
        self.timings.encode += time.perf_counter() - t0
        return feats

    def load_denoiser(self, loras: LoraSet | None = None) -> None:
        """The transformer with `loras` merged, and the VAE unless it is loaded already."""
        t0 = time.perf_counter()
        self.transformer = load_transformer(self.opts.sources, self.storage_device, self.opts.dtype,
                                            self.opts.quantize, loras.patch("transformer") if loras else None)
        if loras:
            loras.close()
        if self.opts.offload == "sequential":
            t = self.transformer
            self.streamer = BlockStreamer(t, self.blocks, self.compute_device)
        if self.opts.compile:
            compile_blocks(self.blocks)
        if self.vae is None:
            self.vae = load_vae(self.opts.sources, self.storage_device, self.opts.vae_dtype, self.opts.dtype)
        if self.controlnet_path:
            self.load_controlnet()
        self.timings.load += time.perf_counter() - t0
        log.info("transformer and VAE loaded in %.1fs", time.perf_counter() - t0)

    @property
    def blocks(self) -> list[torch.nn.Module]:
        t = self.transformer
        return [*t.noise_refiner, *t.context_refiner, *t.layers] if t is not None else []

    def load_controlnet(self) -> None:
        from .controlnet import load_controlnet

        self.controlnet = load_controlnet(Path(self.controlnet_path), self.transformer.cfg, self.storage_device,
                                          self.opts.dtype)
        if self.opts.offload == "sequential":
            self.controlnet_streamer = BlockStreamer(self.controlnet, self.controlnet.blocks, self.compute_device)

    def release_transformer(self) -> None:
        # hooks and compiled forwards hold their blocks in cycles: undo both, so reference counting frees them
        for streamer in (self.streamer, self.controlnet_streamer):
            if streamer is not None:
                streamer.remove()
        uncompile(self.blocks)
        released = [weakref.ref(m) for m in [self.transformer, self.controlnet, *self.blocks] if m is not None]
        self.transformer = self.streamer = self.controlnet = self.controlnet_streamer = None
        free_memory(released, self.compute_device)

    def close(self) -> None:
        self.release_transformer()
        released = [weakref.ref(self.vae)] if self.vae is not None else []
        self.vae = None
        free_memory(released, self.compute_device)

    def denoise_batch(self, batch: list[Job], feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final latents (B, C, h, w), float32 on the compute device, for jobs sharing size and settings."""
        s = batch[0].settings
        model, device = self.transformer, self.compute_device
        c, scale = model.cfg.in_channels, self.vae.cfg.scale_factor
        noise = torch.cat([get_noise(1, c, s.height, s.width, j.settings.seed, scale) for j in batch]).to(device)
        sigmas = get_sigmas(self.scheduler, s.num_steps, (noise.shape[2] // 2) * (noise.shape[3] // 2))
        times = model_times(self.scheduler, sigmas)
        guidance = Guidance(s.guidance_scale, s.cfg_normalization, s.cfg_truncation)
        caps = [feats[j.settings.prompt].to(device) for j in batch]
        neg = [feats[j.settings.negative_prompt].to(device) for j in batch] if guidance.scale > 0 else None
        blend = None
        if s.init_image and not s.control_image:
            noise, sigmas, times, blend = self.picture_start(batch, sigmas, times)
        if s.control_image:
            model = self.controlled(batch)
        if self.opts.offload == "model":
            self.transformer.to(device)
            if self.controlnet is not None:
                self.controlnet.to(device)
        bar = tqdm(total=len(times), desc=f"{len(batch)}x {s.width}x{s.height}", unit="step",
                   disable=not self.opts.progress, leave=False)
        last = [time.perf_counter()]

        def on_step(i: int) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            self.timings.steps.append(now - last[0])
            last[0] = now
            bar.update()

        try:
            return denoise(model, noise, sigmas, times, caps, neg, guidance, on_step, blend)
        finally:
            bar.close()
            if self.opts.offload == "model":
                self.transformer.to("cpu")
                if self.controlnet is not None:
                    self.controlnet.to("cpu")
                empty_cache(device)

    def picture_start(self, batch: list[Job], sigmas: torch.Tensor, times: torch.Tensor) -> tuple:
        """Image-to-image and inpainting: the start latents, the part of the schedule that runs, and the blend
        after each step (inpainting; else None), as the reference's pipelines make them."""
        s, device, c = batch[0].settings, self.compute_device, self.transformer.cfg.in_channels
        start = first_step(s.num_steps, s.strength)
        sigmas, times = sigmas[start:], times[start:]
        t0 = time.perf_counter()
        with self.vae_on_device():
            parts = [start_latents(self.vae, j.settings.init_image, j.settings.seed, s.width, s.height, sigmas[0], c,
                                   device) for j in batch]
        latents, noise, image = (torch.cat(p) for p in zip(*parts))
        blend = None
        if s.mask:
            masks = torch.cat([latent_mask(j.settings.mask, s.width, s.height, latents.shape[-2:], device)
                               for j in batch])
            blend = blender(image, noise, masks, sigmas)
        self.timings.pictures += time.perf_counter() - t0
        return latents, sigmas, times, blend

    def controlled(self, batch: list[Job]):
        """The transformer steered by the ControlNet with the batch's control images (and, for ControlNet
        inpainting, their masks and init images) as the reference's ControlNet pipelines encode them."""
        from .controlnet import Controlled

        s, device = batch[0].settings, self.compute_device
        t0 = time.perf_counter()
        with self.vae_on_device():
            context = torch.cat([control_latents(self.vae, j.settings.control_image, s.width, s.height,
                                                 self.controlnet.cfg.control_in_dim, device, j.settings.init_image,
                                                 j.settings.mask) for j in batch])
        self.timings.pictures += time.perf_counter() - t0
        return Controlled(self.transformer, self.controlnet, context, s.control_scale)

    @contextmanager
    def vae_on_device(self):
        """The VAE on the compute device for the block, back on the CPU after it when offloading."""
        if self.opts.offload != "none":
            self.vae.to(self.compute_device)
        try:
            yield
        finally:
            if self.opts.offload != "none":
                self.vae.to("cpu")
                empty_cache(self.compute_device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        with self.vae_on_device():
            images = self.vae.decode(latents, tile=self.opts.vae_tile)
        self.timings.decode += time.perf_counter() - t0
        return images

    @torch.inference_mode()
    def run(self, jobs: list[Job], batch_size: int, on_image: Callable[[Job, float], None],
            on_error: Callable[[Job, str], None]) -> None:
        """Make every job's image and write it to `job.output`, calling `on_image(job, seconds)` after each write
        and `on_error(job, message)` when a file cannot be written."""
        what = "loading the models"
        self.controlnet_path = next((j.settings.controlnet for j in jobs if j.settings.control_image), None)
        try:
            groups = lora_groups(jobs, self.opts.sources)
            wanted: dict[tuple, tuple[LoraSet | None, list[str]]] = {}  # text-encoder LoRA set -> its prompts
            for refs, (loras, group) in groups.items():
                te = te_refs(refs, loras)
                prompts = wanted.setdefault(te, (loras if te else None, []))[1]
                prompts += [j.settings.prompt for j in group]
                prompts += [j.settings.negative_prompt for j in group if j.settings.guidance_scale > 0]
            feats = {te: self.encode(prompts, loras) for te, (loras, prompts) in wanted.items()}
            todo = [(refs, loras, batch) for refs, (loras, group) in groups.items()
                    for batch in batches(group, batch_size)]
            for n, (refs, loras, batch) in enumerate(todo, start=1):
                if n == 1 or refs != todo[n - 2][0]:  # each LoRA set is merged once, while its transformer loads
                    self.release_transformer()
                    self.load_denoiser(loras)
                s = batch[0].settings
                what = f"making {len(batch)} image(s) of {s.width}x{s.height}{' with CFG' if s.guidance_scale else ''}"
                t0 = time.perf_counter()
                latents = self.denoise_batch(batch, feats[te_refs(refs, loras)])
                if n == len(todo):
                    self.release_transformer()  # not needed again: the decode gets its memory
                images = to_pil(self.decode(latents))
                seconds = (time.perf_counter() - t0) / len(batch)
                for job, image in zip(batch, images):
                    if not job.write:  # made only so that its batch is the one first planned
                        continue
                    with interrupts_held():  # a file on disk is always a file reported, even on Ctrl-C
                        try:
                            save_image(image, job.output, job.metadata, self.opts.overwrite)
                        except OSError as e:  # this file only: the rest of the run can still be written
                            on_error(job, f"could not write {job.output}: {e.strerror or e}")
                            continue
                        on_image(job, seconds)
        except torch.OutOfMemoryError:
            raise OutOfMemory(f"out of {self.compute_device.type} memory while {what} "
                              f"(offload {self.opts.offload})") from None
        finally:
            self.close()
