"""Training SmallCap's cross-attention from cached encoder states, with accelerate (one device or many).

The loop is the reference code's recipe: AdamW, linear decay to 0 without warm-up, gradient clipping,
one sample per (image, caption) pair, dropout of the frozen GPT-2 active. `batch_size` is the batch of one
optimizer step, split over processes and gradient-accumulation steps, so the same command trains the same
model on one device or several. Each checkpoint is a SmallCap directory `load_smallcap` reads, with the
tokenizer and image processor next to it and a `training_state/` to resume from bit for bit.
"""

from __future__ import annotations

import functools
import json
import math
import random
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import logging as transformers_logging

from smallcap.errors import SmallCapError, require_extra
from smallcap.features import EncoderInfo, FeatureCache, extract_features
from smallcap.hub import bundled_path, explain_load_errors
from smallcap.io import atomic_directory, atomic_write_json, atomic_write_text
from smallcap.loading import load_image_processor
from smallcap.modeling import REDUCE_FACTORS, SmallCap, load_smallcap
from smallcap.prompt import load_tokenizer
from smallcap.retrieval.datastore import load_retrieved
from smallcap.training_data import (CaptionDataset, TrainingSample, check_retrieved, collate_batch,
                                    read_training_samples)

LOG_FILE = "train_log.jsonl"
STATE_DIR = "training_state"
MAX_BROKEN_IMAGES = 0.01  # more undecodable images than this fraction (and more than 10) is an error
# Options that change the trained weights: a resumed run must use the same ones.
_RESULT_FIELDS = ("data", "split", "retrieved", "encoder", "decoder", "reduce_factor", "k", "epochs", "lr",
                  "betas", "eps", "weight_decay", "batch_size", "gradient_accumulation_steps", "grad_clip",
                  "seed", "train_decoder", "no_retrieval", "sample_k_from_7", "mixed_precision")


@dataclass
class TrainingConfig:
    """Everything a training run depends on; the defaults are the reference code's."""

    data: str
    output_dir: str
    retrieved: str | None = None
    images: str | None = None
    split: str | None = None
    features: str | None = None  # the encoder-state cache; default OUTPUT_DIR/features
    encoder: str = "openai/clip-vit-base-patch32"
    decoder: str = "gpt2"
    reduce_factor: int = 4
    k: int = 4
    epochs: int = 10
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    grad_clip: float = 1.0
    seed: int = 42
    train_decoder: bool = False
    no_retrieval: bool = False
    sample_k_from_7: bool = False
    mixed_precision: str | None = None  # no | bf16 | fp16; None: accelerate's setting (`accelerate launch`)
    save_every_steps: int | None = None
    resume: str | None = None  # a checkpoint directory, or "latest" in output_dir
    num_workers: int = 0
    progress: bool = True


def training_loss(model, batch: dict[str, torch.Tensor], total_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Token cross-entropy of a collated batch, the decoder attending to the cached encoder states.

    The LM head (a 768 x 50257 product per position) runs only at the label positions, about a fifth of a
    k=4 prompt, instead of everywhere as the stock forward does; the loss is the same to float rounding.
    Returns the summed token loss divided by `total_tokens` (default: this batch's label count, i.e. the mean).
    """
    outputs = model(encoder_outputs=BaseModelOutput(last_hidden_state=batch["encoder_hidden_states"]),
                    decoder_input_ids=batch["decoder_input_ids"], output_hidden_states=True,
                    decoder_logits_to_keep=1, use_cache=False)
    labels = batch["labels"]
    positions = labels != -100
    head = _unwrap(model).decoder.get_output_embeddings()
    logits = head(outputs.decoder_hidden_states[-1][positions])
    summed = torch.nn.functional.cross_entropy(logits.float(), labels[positions], reduction="sum")
    return summed / (positions.sum() if total_tokens is None else total_tokens)


def _unwrap(model):
    """The SmallCap inside a DistributedDataParallel (or compiled) wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


class EpochShuffle(torch.utils.data.Sampler):
    """A new permutation per epoch, a function of (seed, epoch) only, so a resumed run sees the same order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration yields."""
        self.epoch = epoch

    def __iter__(self):
        order = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=order).tolist())

    def __len__(self) -> int:
        return self.size


def train(config: TrainingConfig) -> Path:
    """Train (or resume training) and return the final checkpoint directory. Input problems fail before step 1."""
    accelerate = require_extra("accelerate", "train", "Training")
    from accelerate.state import AcceleratorState, GradientState

    _validate(config)
    # cpu=True on a machine without GPUs, so that `torchrun --nproc-per-node N` gives N CPU processes (gloo).
    accelerator = accelerate.Accelerator(cpu=not torch.accelerator.is_available(), mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              dataloader_config=accelerate.DataLoaderConfiguration(split_batches=True))
    try:
        _check_device(config, accelerator)
        return _train(replace(config, mixed_precision=accelerator.mixed_precision), accelerator)
    finally:
        # Let a later train() in this process choose another precision or accumulation (the process group stays).
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train(config: TrainingConfig, accelerator) -> Path:
    from accelerate.utils import set_seed

    output_dir = Path(config.output_dir)
    resume_dir, state = _resume_point(config, output_dir)

    samples = read_training_samples(config.data, config.images, config.split)
    retrieved = None
    if not config.no_retrieval:
        retrieved = load_retrieved(config.retrieved)
        check_retrieved(retrieved, samples, config.k, source=config.retrieved)
    set_seed(config.seed)
    model, tokenizer, plain_tokenizer, processor = _load_model(config, resume_dir)
    with accelerator.main_process_first():
        features, samples = prepare_features(samples, model.encoder, processor,
                                             config.features or output_dir / "features", config.encoder,
                                             accelerator.device, config.progress and accelerator.is_main_process)

    dataset = CaptionDataset(samples, features, tokenizer, retrieved, config.k, config.sample_k_from_7, config.seed)
    micro_batch = config.batch_size // config.gradient_accumulation_steps
    sampler = EpochShuffle(len(dataset), config.seed)
    # Its own generator, so that starting an epoch's iterator never draws from the global (dropout) RNG.
    collate = functools.partial(collate_batch, pad_token_id=tokenizer.pad_token_id)  # the family's '!'
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch, sampler=sampler, collate_fn=collate,
                                         num_workers=config.num_workers, generator=torch.Generator())
    batches_per_epoch = math.ceil(len(dataset) / micro_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = steps_per_epoch * config.epochs

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                  weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=total_steps)
    saved = torch.load(resume_dir / STATE_DIR / "state.pt", map_location="cpu", weights_only=True) if resume_dir else None
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if saved:
        if accelerator.scaler is not None and saved.get("scaler"):
            accelerator.scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"][min(accelerator.process_index, len(saved["rng"]) - 1)])
    else:
        set_seed(config.seed)  # the dropout stream starts here, whether or not features were extracted first

    global_step = state["global_step"] if state else 0
    start_epoch, steps_done = divmod(global_step, steps_per_epoch)
    log_path = output_dir / LOG_FILE
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, global_step)
        print(f"smallcap train: {len(dataset)} samples ({len({s.image_id for s in samples})} images), "
              f"{steps_per_epoch} steps x {config.epochs} epochs, batch {config.batch_size} on "
              f"{accelerator.num_processes} process(es), {sum(p.numel() for p in trainable):,} trainable parameters"
              + (f"; resuming from {resume_dir} at step {global_step}" if resume_dir else ""), file=sys.stderr)


    bar = tqdm(total=total_steps, initial=global_step, desc="training", unit="step", file=sys.stderr,
               disable=not (config.progress and accelerator.is_main_process))
    last_checkpoint = resume_dir
    model.train()
    for epoch in range(start_epoch, config.epochs):
        loader.set_epoch(epoch)  # accelerate passes it on to the sampler (order) and the dataset (caption draws)
        skip = steps_done * config.gradient_accumulation_steps if epoch == start_epoch else 0
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        step_in_epoch = steps_done if epoch == start_epoch else 0
        losses = []
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                # Token-weighted across processes: each process divides its summed loss by the label count of
                # all processes, times their number because DDP averages the gradients.
                tokens = (batch["labels"] != -100).sum()
                all_tokens = accelerator.reduce(tokens, "sum")
                loss = training_loss(model, batch, all_tokens / accelerator.num_processes)
                accelerator.backward(loss)
                losses.append(loss.detach() / accelerator.num_processes)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable, config.grad_clip)
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step, step_in_epoch = global_step + 1, step_in_epoch + 1
            step_loss = accelerator.reduce(torch.stack(losses).mean(), "sum").item()
            losses = []
            if accelerator.is_main_process:
                _append_log(log_path, {"step": global_step, "epoch": round(epoch + step_in_epoch / steps_per_epoch, 4),
                                       "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm)})
            bar.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch + 1)
            bar.update(1)
            if (config.save_every_steps and global_step % config.save_every_steps == 0
                    and step_in_epoch < steps_per_epoch):
                last_checkpoint = _save_checkpoint(accelerator, model, optimizer, scheduler, plain_tokenizer, processor,
                                                   config, output_dir / f"step-{global_step}", global_step, step_loss)
        last_checkpoint = _save_checkpoint(accelerator, model, optimizer, scheduler, plain_tokenizer, processor, config,
                                           output_dir / f"epoch-{epoch + 1}", global_step, step_loss)
    bar.close()
    accelerator.end_training()
    return Path(last_checkpoint)


def _load_model(config: TrainingConfig, resume_dir: Path | None):
    """(model, tokenizer, tokenizer as shipped, image processor): new from encoder + decoder, or a checkpoint's."""
    if resume_dir:
        model = load_smallcap(resume_dir)
    else:
        model = SmallCap.from_encoder_decoder_pretrained(config.encoder, config.decoder, config.reduce_factor)
        model.config.k, model.config.rag = config.k, not config.no_retrieval
    model.freeze_for_training(train_decoder=config.train_decoder)
    source = str(resume_dir) if resume_dir else None
    decoder, encoder = (str(bundled_path(name) or name) for name in (config.decoder, config.encoder))
    tokenizer = load_tokenizer(source or decoder, model.config.decoder.model_type)
    if not resume_dir:  # the family's pad '!' and end '.' ids (GPT-2's are the config defaults)
        model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    # Checkpoints get the tokenizer as the decoder ships it: saved with eos '.', transformers 5 would reload '.'
    # as a special token and split '..' (id 492) into two ids; `load_tokenizer` sets '!' and '.' at load time.
    with explain_load_errors(source or decoder, "tokenizer"):
        plain_tokenizer = AutoTokenizer.from_pretrained(source or decoder)
    processor = load_image_processor(source or encoder)
    return model, tokenizer, plain_tokenizer, processor


def prepare_features(samples: list[TrainingSample], encoder, processor, cache_dir, encoder_name: str,
                     device=None, progress: bool = True) -> tuple[FeatureCache, list[TrainingSample]]:
    """The feature cache covering `samples`: reuse what `cache_dir` holds (same encoder only), encode the rest.

    Returns the cache and the samples whose image could be encoded; a handful of undecodable images is skipped
    and counted, more is an error.
    """
    cache_dir = Path(cache_dir)
    info = EncoderInfo.of(encoder, encoder_name)
    cache = FeatureCache(cache_dir) if (cache_dir / "manifest.json").exists() else None
    if cache is not None:
        cache.check_encoder(info)
    have = set(cache or ()) | set(cache.skipped if cache else ())
    todo = {s.image_id: s.image_path for s in samples if s.image_id not in have}
    no_file = sorted(i for i, p in todo.items() if p is None)
    if no_file:
        raise SmallCapError(f"{len(no_file)} images are neither in the feature cache {cache_dir} nor have an image "
                            f"file, e.g. {', '.join(no_file[:5])}")
    if todo:
        extract_features(sorted(todo.items()), encoder, cache_dir, processor=processor, device=device,
                         progress=progress)
    cache = FeatureCache(cache_dir)
    images = {s.image_id for s in samples}
    broken = sorted(images & set(cache.skipped))
    if broken:
        if len(broken) > max(10, MAX_BROKEN_IMAGES * len(images)):
            raise SmallCapError(f"{len(broken)} of {len(images)} images could not be decoded, e.g. "
                                f"{cache.skipped[broken[0]]}")
        samples = [s for s in samples if s.image_id not in cache.skipped]
        print(f"smallcap train: skipping {len(broken)} undecodable image(s) and their captions: "
              f"{', '.join(broken[:5])}", file=sys.stderr)
    return cache, samples


def _validate(config: TrainingConfig) -> None:
    checks = [
        (config.epochs >= 1, f"--epochs must be at least 1, got {config.epochs}"),
        (config.lr > 0, f"--lr must be positive, got {config.lr}"),
        (config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}"),
        (config.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be at least 1"),
        (config.batch_size % config.gradient_accumulation_steps == 0,
         f"--batch-size {config.batch_size} is not divisible by --gradient-accumulation-steps "
         f"{config.gradient_accumulation_steps}"),
        (config.reduce_factor in REDUCE_FACTORS, f"--reduce-factor must be one of {REDUCE_FACTORS}"),
        (config.k >= 1, f"--k must be at least 1, got {config.k}"),
        (not (config.sample_k_from_7 and config.k > 7), "--sample-k-from-7 needs --k of at most 7"),
        (not (config.sample_k_from_7 and config.no_retrieval), "--sample-k-from-7 needs retrieval"),
        (config.no_retrieval or config.retrieved is not None,
         "pass --retrieved FILE (the retrieved captions of each training image) or --no-retrieval"),
        (config.mixed_precision in (None, "no", "bf16", "fp16"), "--mixed-precision must be no, bf16 or fp16"),
        (not config.save_every_steps or config.save_every_steps >= 1, "--save-every-steps must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise SmallCapError(message)


def _check_device(config: TrainingConfig, accelerator) -> None:
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise SmallCapError("fp16 mixed precision needs a GPU; on CPU use --mixed-precision bf16 or no")
    micro_batch = config.batch_size // config.gradient_accumulation_steps
    if micro_batch % accelerator.num_processes:
        raise SmallCapError(f"the batch of {micro_batch} per accumulation step does not split evenly over "
                            f"{accelerator.num_processes} processes; choose --batch-size accordingly")


def _result_options(config: TrainingConfig) -> dict:
    options = {name: getattr(config, name) for name in _RESULT_FIELDS}
    for name in ("data", "retrieved"):
        options[name] = str(Path(options[name]).resolve()) if options[name] else None
    options["betas"] = list(options["betas"])
    options["mixed_precision"] = options["mixed_precision"] or "no"
    return options


def _resume_point(config: TrainingConfig, output_dir: Path) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its trainer state; refuse to silently mix runs in one directory."""
    existing = _checkpoints(output_dir)
    if config.resume is None:
        if existing:
            raise SmallCapError(f"{output_dir} already holds checkpoints ({existing[-1][1].name}, ...): pass --resume "
                                "to continue that run, or choose another --output-dir")
        return None, None
    if config.resume == "latest":
        if not existing:
            raise SmallCapError(f"--resume: {output_dir} holds no checkpoint to resume from")
        directory = existing[-1][1]
    else:
        directory = Path(config.resume)
        if not (directory / STATE_DIR / "trainer_state.json").is_file():
            raise SmallCapError(f"--resume {directory}: not a training checkpoint (no {STATE_DIR}/trainer_state.json)")
    with open(directory / STATE_DIR / "trainer_state.json", encoding="utf-8") as handle:
        state = json.load(handle)
    now = _result_options(config)
    changed = [f"{key} ({state['options'].get(key)!r} -> {now[key]!r})" for key in now
               if state["options"].get(key) != now[key]]
    if changed:
        raise SmallCapError(f"--resume {directory}: these options differ from the run being resumed, so it could "
                            f"not continue exactly: {'; '.join(changed)}")
    return directory, state


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in output_dir.glob("*/" + STATE_DIR + "/trainer_state.json"):
        with open(path, encoding="utf-8") as handle:
            found.append((json.load(handle)["global_step"], path.parent.parent))
    return sorted(found)


def _save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, processor, config: TrainingConfig,
                     directory: Path, global_step: int, loss: float) -> Path:
    """Write a complete checkpoint atomically from the main process; every process contributes its RNG state."""
    from accelerate.utils import gather_object

    rng_states = gather_object([_rng_state()])
    if accelerator.is_main_process:
        bars = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # no "Writing model shards" bar inside the training bar
        # A resumed run may rewrite checkpoints that the interrupted run wrote after its resume point.
        with atomic_directory(directory, overwrite=True) as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            (tmp / STATE_DIR).mkdir()
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                        "rng": rng_states}, tmp / STATE_DIR / "state.pt")
            atomic_write_json(tmp / STATE_DIR / "trainer_state.json", {
                "global_step": global_step, "loss": loss, "num_processes": accelerator.num_processes,
                "options": _result_options(config), "config": {f.name: _jsonable(getattr(config, f.name))
                                                               for f in fields(config)}})
        if bars:
            transformers_logging.enable_progress_bar()
    accelerator.wait_for_everyone()
    return directory


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _rng_state() -> dict:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position,
                                                    has_gauss, gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _truncate_log(path: Path, global_step: int) -> None:
    """Keep the log lines of the steps before `global_step` (a resumed run rewrites the ones after it)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line)["step"] <= global_step]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_log(output_dir: str | Path) -> list[dict]:
    """The per-step records of a run's loss log."""
    path = Path(output_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

