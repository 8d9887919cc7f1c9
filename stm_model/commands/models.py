"""The model and device options of the segmenting commands (--checkpoint, --random-weights,
--config, --device, --amp): the torch side of stm_model.commands.common."""
import sys

from stm_model.cli import UsageError
from stm_model.commands.common import DEFAULT_CHECKPOINT
from stm_model.network.checkpoint import (OFFICIAL, acknowledge_synthetic_only, load_checkpoint,
                                          resolve_checkpoint, synthetic_only_name,
                                          synthetic_only_note)
from stm_model.network.stm import STM, STMConfig
from stm_model.runtime.devices import autocast_is_slow, resolve_device


def device_named(name):
    """The torch device named by --device, or UsageError (devices.resolve_device)."""
    try:
        return resolve_device(name)
    except ValueError as error:
        raise UsageError(str(error)) from None


def warn_if_autocast_on_cpu(amp, device):
    """--amp fp16 or bf16 where the CPU has no native instructions for it (autocast_is_slow):
    say so once, before the work (auto picks bf16 only where the CPU has them)."""
    if amp in ("fp16", "bf16") and autocast_is_slow(device, amp):
        print(f"warning: --amp {amp} on this CPU is many times slower than float32 (it has no "
              f"native {amp} matrix instructions); drop --amp here", file=sys.stderr)


def checkpoint_path(name, show_progress=True):
    """The file of a --checkpoint value (a shipped model's name, official: downloaded on first
    use, with a progress bar, or a path), or UsageError; a download that fails is one line
    (OSError)."""
    try:
        return resolve_checkpoint(name, show_progress=show_progress)
    except FileNotFoundError as error:
        raise UsageError(f"--checkpoint: {error}") from None


def load_model(name, device, quiet=False):
    """The model of a --checkpoint value on device, in eval mode; a shipped model trained on
    synthetic video only says so in one line (on stderr), naming --checkpoint small-real (the
    default) and official, instead of its sessions' SyntheticOnlyWarning."""
    path = checkpoint_path(name, show_progress=not quiet)
    synthetic = synthetic_only_name(path)
    if synthetic:
        print(f"note: {synthetic_only_note(synthetic, cli=True)}", file=sys.stderr)
    return acknowledge_synthetic_only(load_checkpoint(path, device))


def build_model(args, device):
    warn_if_autocast_on_cpu(getattr(args, "amp_dtype", None), device)
    if not args.random_weights:
        return load_model(args.checkpoint or DEFAULT_CHECKPOINT, device,
                          getattr(args, "quiet", False))
    print("warning: --random-weights: an untrained network, for training experiments; its "
          "masks are meaningless (drop it to segment with the trained small model)",
          file=sys.stderr)
    config = STMConfig() if args.config in (None, "official") else STMConfig.small()
    return STM(config).to(device).eval()


def check_model_arguments(args):
    """The model options' combinations, before any work."""
    if args.random_weights and args.checkpoint:
        raise UsageError("--random-weights and --checkpoint exclude each other")
    if args.config and not args.random_weights:
        raise UsageError("--config applies with --random-weights (a checkpoint holds its own "
                         "size)")
    if not args.random_weights and args.checkpoint != OFFICIAL:  # downloaded when loaded
        checkpoint_path(args.checkpoint or DEFAULT_CHECKPOINT)
