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
    save_every: int = 200

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
          "(EfficientNet-Lite0 encoders from ImageNet weights, needs stm-kernels[train]) or "
          "official (ResNet-50)",
    data="training videos: synthetic (generated, deterministic) or a DAVIS-format root",
    sequences="with a DAVIS-format root: the sequences to train on (default: all); the "
              "static-image stage takes its images from the same ones",
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
    save_every="steps between checkpoints")


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
                   warmup_steps=0, workers=0, log_every=1, save_every=1)
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
    if config.augment and config.data == "synthetic":
        raise ValueError("augment needs a DAVIS-format data root; data is synthetic")
    if not all(isinstance(name, str) and name for name in config.sequences):
        raise ValueError(f"sequences must be sequence names; got {config.sequences}")
    if not 0 <= config.trunk_lr_scale <= 1:
        raise ValueError(f"trunk_lr_scale must be in [0, 1]; got {config.trunk_lr_scale}")
    if not 0 < config.bootstrap <= 1:
        raise ValueError(f"bootstrap must be in (0, 1]; got {config.bootstrap}")
    if not 0 <= config.synthetic_ratio <= 1:
        raise ValueError(f"synthetic_ratio must be in [0, 1]; got {config.synthetic_ratio}")


def add_arguments(parser):
    """Add one option per TrainConfig field (and --no-progress) to an argparse parser, under
    the field's name (its flag: FLAGS, else the name with dashes); returns the parser."""
    for field in dataclasses.fields(TrainConfig):
        name = FLAGS.get(field.name, "--" + field.name.replace("_", "-"))
        text = HELP[field.name]
        if field.name in NAME_LISTS:
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
