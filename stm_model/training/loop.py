"""STM main training: clips of frames, each later frame segmented from the memory of all earlier
ones (see `ClipForward`), cross-entropy on the soft-aggregated logits, AdamW with warm-up and a
cosine schedule, bf16 autocast on GPU, DDP under torchrun, atomic resumable checkpoints.

    python -m stm_model.training.loop --output runs/small --steps 3000    # also: stm train ...
    torchrun --nproc_per_node 2 -m stm_model.training.loop --output runs/ddp ...

Resuming: run the same command again; it continues from <output>/checkpoint.pt (model,
optimiser, scheduler, step, RNG states), saved every --save-every steps or duration and on
Ctrl-C (the last step completed). Clips are a pure function of (seed, step, rank, slot),
so a resumed run sees exactly the clips the uninterrupted run would have seen. A finished run
whose model.pt is missing (killed after its last checkpoint) writes it; temporary files of
checkpoint saves killed mid-write are removed.
"""
import argparse
import contextlib
import csv
import dataclasses
import math
import os
import pathlib
import random
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from stm_model.io.files import remove_temporary_files
from stm_model.network.checkpoint import load_checkpoint, save_checkpoint
from stm_model.training.clip_forward import ClipForward
from stm_model.training.config import DESCRIPTION, TrainConfig, add_arguments
from stm_model.training.datasets import (DavisClips, DavisFrames, InteractiveClips, MixedClips,
                                         PastedObjects, StaticImageClips, SyntheticClips,
                                         collate_clips, max_skip_schedule)
from stm_model.network.stm import STM, STMConfig, load_into_interactive, trunk_parameters

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
METRICS = "metrics.csv"
class StepSampler(torch.utils.data.Sampler):
    """Dataset indices of this rank's batches for steps [start, steps): step s, rank r and slot
    i read item (s·world + r)·batch + i, so ranks never share clips and a resumed run picks up
    exactly where the interrupted one stopped (a distributed sampler without state)."""

    def __init__(self, steps, batch_size, rank=0, world_size=1, start=0):
        self.steps, self.batch_size = steps, batch_size
        self.rank, self.world_size, self.start = rank, world_size, start

    def __len__(self):
        return max(self.steps - self.start, 0) * self.batch_size

    def __iter__(self):
        for step in range(self.start, self.steps):
            first = (step * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)


def build_dataset(config, world_size=1):
    """Item i belongs to step i // (batch · world); the max-skip curriculum follows the step.
    With a DAVIS root, both stages read its `sequences` (the static one their annotated frames)
    and take a `synthetic_ratio` fraction of their clips from synthetic videos instead."""
    per_step = config.batch_size * world_size
    length = config.steps * per_step

    def max_skip(index):
        return max(1, max_skip_schedule(index // per_step, config.steps, *config.max_skip))
    common = dict(clip_len=config.clip_len, size=config.size, max_objects=config.max_objects,
                  seed=config.seed)
    videos = SyntheticClips(length, max_skip=max_skip, **common)
    static = StaticImageClips(length, **common) if config.static_steps else None
    if config.data != "synthetic":
        synthetic_videos, synthetic_static = videos, static
        labels = config.labels or None
        videos = DavisClips(config.data, length, max_skip=max_skip, sequences=config.sequences,
                            augment=config.augment, labels=labels, **common)
        if config.paste_objects:
            donors = DavisClips(config.data, length, max_skip=max_skip,
                                sequences=config.sequences, augment=config.augment,
                                labels=labels, **{**common, "seed": config.seed + 1})
            videos = PastedObjects(videos, donors, config.paste_objects, config.max_objects,
                                   seed=config.seed)
        if static is not None:
            static = StaticImageClips(length, source=DavisFrames(config.data, config.sequences,
                                                                 labels=labels), **common)
        if config.synthetic_ratio:
            videos = MixedClips(videos, synthetic_videos, config.synthetic_ratio, config.seed)
            if static is not None:
                static = MixedClips(static, synthetic_static, config.synthetic_ratio,
                                    config.seed)
    if static is not None:
        videos = _Staged(static, videos, config.static_steps * per_step)
    return InteractiveClips(videos, seed=config.seed) if config.interactive else videos


class _Staged(torch.utils.data.Dataset):
    """Items below `switch` from the first dataset (pre-training), the rest from the second."""

    def __init__(self, first, second, switch):
        self.first, self.second, self.switch = first, second, switch

    def __len__(self):
        return len(self.second)

    def __getitem__(self, index):
        return (self.first if index < self.switch else self.second)[index]


def build_model(config):
    """The STM to train; with init_from, its weights (an interactive model built from a
    semi-supervised one gets the zero-initialised scribble conv on top); otherwise small-real
    starts from the ImageNet weights of its encoders' trunk (config.trunk)."""
    if config.model == "small-real":
        model_config = STMConfig.small_real(pretrained_backbone=not config.init_from,
                                            backbone=config.trunk)
    else:
        model_config = STMConfig.small() if config.model == "small" else STMConfig()
    model_config = dataclasses.replace(model_config, read_backend=config.read_backend,
                                       interactive=config.interactive)
    model = STM(model_config)
    if config.init_from:
        load_into_interactive(model, load_checkpoint(config.init_from).state_dict(),
                              source=f"the weights of --init-from {config.init_from}")
    return model


def freeze_encoder_batch_norms(model):
    """Put the encoders' BatchNorm layers in eval mode: they normalise with their running
    statistics, which stay as they are; their scale and shift still train."""
    for encoder in (model.memory_encoder, model.query_encoder):
        for module in encoder.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def parameter_groups(model, lr, trunk_lr_scale):
    """AdamW's parameter groups: the encoders' trunk parameters (stm.trunk_parameters) at
    lr * trunk_lr_scale, all the others (the encoders' mask and scribble convs, keys and values,
    decoder) at lr, last (the rate metrics.csv logs); one group when the scale is 1. The
    scheduler's factor applies to both."""
    if trunk_lr_scale == 1:
        return [dict(params=list(model.parameters()), lr=lr)]
    trunk = list(trunk_parameters(model))
    in_trunk = {id(parameter) for parameter in trunk}
    rest = [parameter for parameter in model.parameters() if id(parameter) not in in_trunk]
    return [dict(params=trunk, lr=lr * trunk_lr_scale), dict(params=rest, lr=lr)]


def hardest_fraction(step, steps, final):
    """The share of pixels bootstrapped cross-entropy keeps at `step` of `steps`: all of them
    for the first 20% of the run, down linearly to `final` at 80%, `final` after (STCN's
    schedule, scaled to the run's length)."""
    if final >= 1:
        return 1.0
    ramp = min(max((step / max(steps, 1) - 0.2) / 0.6, 0.0), 1.0)
    return 1.0 + (final - 1.0) * ramp


def clip_loss(forward, batch, device, amp_dtype=None, keep=1.0):
    """Mean cross-entropy of the soft-aggregated logits of frames 1..T-1 (0..T-1 for the
    interactive model); forward: a ClipForward (or its DistributedDataParallel). keep < 1:
    bootstrapped cross-entropy, the mean over that share of the batch's pixels with the
    largest loss (the hard ones: boundaries, thin parts, distractors)."""
    frames = batch["frames"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    scribbles = batch.get("first_scribbles")
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                        enabled=amp_dtype is not None):
        logits = forward(frames, batch["first_probs"].to(device), batch["object_valid"],
                         None if scribbles is None else scribbles.to(device))
    # frames 1..T-1; the interactive model also predicts frame 0
    targets = labels[:, labels.shape[1] - logits.shape[1]:]
    if keep >= 1:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))
    pixels = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1),
                             reduction="none").flatten()
    hardest = max(1, int(keep * pixels.numel()))
    return pixels.topk(hardest, sorted=False).values.mean()


def _schedule(config):
    def factor(step):
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _rng_state():
    """Torch (CPU, CUDA), Python and NumPy global RNG states, in types torch.load accepts with
    weights_only=True."""
    version, words, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": (version, list(words), gauss),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached)}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), position, has_gauss, cached))


def _distributed():
    """(rank, world size, device) from torchrun's environment; initialises the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world_size, device


def train(config, show_progress=True):
    """Train (or resume) a run; returns the trained STM (unwrapped, in eval mode)."""
    rank, world_size, device = _distributed()
    output = pathlib.Path(config.output)
    torch.manual_seed(config.seed)
    model = build_model(config).to(device).train()
    if config.freeze_bn:
        freeze_encoder_batch_norms(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.lr, config.trunk_lr_scale),
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    start = 0
    if rank == 0:
        _remove_interrupted_saves(output)
    if (output / CHECKPOINT).exists():
        payload = torch.load(output / CHECKPOINT, map_location=device, weights_only=True)
        model.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        _set_rng_state(payload["rng"])
        start = payload["step"]
        _warn_if_config_changed(payload.get("train_config"), config)
    forward = ClipForward(model, config.checkpointing)
    if world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(forward)
    loader = torch.utils.data.DataLoader(
        build_dataset(config, world_size), batch_size=config.batch_size,
        sampler=StepSampler(config.steps, config.batch_size, rank, world_size, start),
        collate_fn=lambda items: collate_clips(items, config.max_objects),
        num_workers=config.workers, pin_memory=device.type == "cuda")
    amp_dtype = torch.bfloat16 if config.amp and device.type == "cuda" else None
    log = _MetricsLog(output / METRICS, resume_step=start) if rank == 0 else None
    progress = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True,
                    disable=rank != 0 or not show_progress)
    tick, clips = time.perf_counter(), 0
    done = saved = start  # the last step completed; the step checkpoint.pt holds
    rng, saved_at = _rng_state(), time.monotonic()
    try:
        for step, batch in zip(range(start, config.steps), loader, strict=False):
            loss = clip_loss(forward, batch, device, amp_dtype,
                             hardest_fraction(step, config.steps, config.bootstrap))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            # a checkpoint holds whole steps only, each with its metrics row when one is due
            with _uninterrupted():
                optimizer.step()
                scheduler.step()
                done, rng = step + 1, _rng_state()
                clips += config.batch_size * world_size
                if rank == 0 and (done % config.log_every == 0 or done == config.steps):
                    elapsed = time.perf_counter() - tick
                    row = dict(step=done, loss=loss.item(), lr=scheduler.get_last_lr()[-1],
                               max_skip=max(1, max_skip_schedule(step, config.steps,
                                                                 *config.max_skip)),
                               clips_per_s=clips / elapsed, it_per_s=clips / elapsed /
                               (config.batch_size * world_size))
                    log.write(row)
                    progress.set_postfix(loss=f"{row['loss']:.4f}",
                                         it_s=f"{row['it_per_s']:.2f}")
                    tick, clips = time.perf_counter(), 0
            if rank == 0:
                progress.update(1)
                if _save_due(config, done, saved_at):
                    _save(model, optimizer, scheduler, done, config, output, rng)
                    saved, saved_at = done, time.monotonic()
                    if done == config.steps:
                        save_checkpoint(model, output / MODEL, step=done)
    except KeyboardInterrupt:  # Ctrl-C: keep the last step completed (rank 0 writes)
        progress.close()
        if rank == 0 and done > saved:
            _save(model, optimizer, scheduler, done, config, output, rng)
            saved = done
        raise TrainingInterrupted(
            f"kept step {saved} of {config.steps} in {output / CHECKPOINT}; run the same "
            "command again to resume" if saved else
            "stopped before the first step ended: nothing to keep") from None
    progress.close()
    if world_size > 1:
        # DDP syncs BatchNorm running statistics from rank 0 at every forward, but the last
        # forward's update is local: broadcast once more so every replica ends identical
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        dist.barrier()
    if rank == 0 and start >= config.steps and not (output / MODEL).exists():
        # killed after its last checkpoint but before model.pt: the checkpoint holds the
        # final model, so finish the run's output
        save_checkpoint(model, output / MODEL, step=start)
    return model.eval()


def _remove_interrupted_saves(output):
    """Remove the temporary files that checkpoint saves (and metrics rewrites) killed
    mid-write left in output: save_checkpoint writes <name><random>.tmp and renames it."""
    if not output.is_dir():
        return
    remove_temporary_files(output)  # .<name>.<random>.tmp (stm_model.io.files)
    for name in (CHECKPOINT, MODEL):  # <name><random>.tmp, as earlier versions wrote them
        for path in output.glob(f"{name}*.tmp"):
            path.unlink(missing_ok=True)
    (output / METRICS).with_suffix(".tmp").unlink(missing_ok=True)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which step's checkpoint is kept."""


# the signals that stop a run and keep its last step: Ctrl-C, and a scheduler's or `kill`'s
# SIGTERM (stm train turns it into a KeyboardInterrupt while it trains: _stop_on_sigterm)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _uninterrupted():
    """A stop signal (STOP_SIGNALS) inside the block takes effect at its end (main thread
    only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {number: signal.signal(number, lambda *received: caught.append(received))
                for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if caught:
        number, frame = caught[0]
        handler = previous[number]
        if callable(handler):
            handler(number, frame)
        elif handler == signal.SIG_DFL and number == signal.SIGINT:
            raise KeyboardInterrupt
        elif handler == signal.SIG_DFL:
            signal.raise_signal(number)  # the default action, now that the step is whole


@contextlib.contextmanager
def _stop_on_sigterm():
    """Within the block, SIGTERM stops training as Ctrl-C does (the last step completed is
    kept): schedulers and `kill` send it before they kill a run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(number, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _save_due(config, done, saved_at):
    """Whether step `done` ends with a checkpoint: every save_every steps, after
    save_every_seconds since the last one (0: never by that), and at the last step."""
    return done == config.steps or bool(config.save_every and done % config.save_every == 0) \
        or bool(config.save_every_seconds and
                time.monotonic() - saved_at >= config.save_every_seconds)


def _save(model, optimizer, scheduler, step, config, output, rng):
    """checkpoint.pt of step `step` (atomically: save_checkpoint), rng: the RNG states then."""
    save_checkpoint(model, output / CHECKPOINT, optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), step=step, rng=rng,
                    train_config=dataclasses.asdict(config))


def _warn_if_config_changed(saved, config):
    """Resuming with other settings (e.g. more steps) is allowed but changes the learning-rate
    and max-skip schedules mid-run, so say so."""
    if saved is None:
        return
    current = dataclasses.asdict(config)
    changed = [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in current
               if k != "output" and k in saved and _plain(saved[k]) != _plain(current[k])]
    if changed:
        warnings.warn("resuming with a different training config (schedules follow the new "
                      "one): " + "; ".join(changed), stacklevel=3)


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


class _MetricsLog:
    """Appends rows to a CSV file (header written once), flushed every row. On resume, rows
    logged after the checkpoint (by a run killed between a log and the next save) are dropped,
    so every step appears exactly once."""

    def __init__(self, path, resume_step=0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            lines = path.read_text().splitlines(keepends=True)
            kept = lines[:1] + [line for line in lines[1:]
                                if int(line.split(",", 1)[0]) <= resume_step]
            if len(kept) != len(lines):
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, path)

    def write(self, row):
        new = not self.path.exists()
        with open(self.path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v
                             for k, v in row.items()})


def _parser():
    return add_arguments(argparse.ArgumentParser(
        prog="stm train", description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))


def run(args):
    """Train from parsed arguments (see add_arguments); returns the exit code."""
    args = dict(vars(args))
    show = not args.pop("no_progress")
    for name in ("command", "run"):  # set by the `stm` command's parser
        args.pop(name, None)
    config = TrainConfig(**args)
    from stm_model.io.run_lock import output_lock  # one run per --output; rank 0 holds it
    with output_lock(config.output, "stm train",
                     enabled=int(os.environ.get("RANK", "0")) == 0):
        try:
            with _stop_on_sigterm():
                train(config, show_progress=show)
        except TrainingInterrupted as stopped:  # Ctrl-C, SIGTERM: one line, exit code 130
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"stm train: interrupted: {stopped}", file=sys.stderr)
            return 130
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank (one process: 0)
        print(f"trained model: {pathlib.Path(config.output) / MODEL} (load it with --checkpoint "
              "or stm_model.load_checkpoint)")
    return 0


def main(argv=None):
    """`python -m stm_model.training.loop`; returns the exit code."""
    return run(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
