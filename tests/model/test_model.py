"""The STM network and checkpoints: golden outputs of the official code, checkpoint loading."""
import sys

import numpy as np
import pytest
import torch

from helpers import SHARED, relative_error
from stm_model import (STM, CheckpointError, STMConfig, VideoSegmenter, load_checkpoint,
                       load_official_checkpoint, save_checkpoint)
from stm_model.network.checkpoint import official_to_ours, ours_to_official

REFERENCE = SHARED / "reference"


@pytest.fixture(scope="module")
def recipe():
    if not (REFERENCE / "official_weights_recipe.py").exists():
        pytest.skip("../shared/reference is absent")
    sys.path.insert(0, str(REFERENCE))
    try:
        from official_weights_recipe import make_official_state_dict
    finally:
        sys.path.remove(str(REFERENCE))
    return make_official_state_dict


@pytest.fixture(scope="module")
def golden(recipe):
    data = dict(np.load(REFERENCE / "stm_golden_A.npz"))
    model = load_official_checkpoint(recipe(int(data["weight_seed"])))
    return model, {name: torch.from_numpy(np.asarray(value)) for name, value in data.items()}


def test_official_parameter_count_and_name_table(recipe):
    state = recipe(0)
    model = STM()
    assert sum(p.numel() for p in model.parameters()) == 38_925_570
    ours = set(model.state_dict())
    assert {official_to_ours(name) for name in state} == ours
    assert {"module." + ours_to_official(name) for name in ours} == set(state)


@pytest.mark.parametrize("backend", ["auto", "naive"])
def test_segmenter_reproduces_the_official_golden_outputs(golden, backend):
    """Frames 1 and 2 of stm_golden_A.npz within 1e-4 relative (measured: ~1e-6)."""
    model, data = golden
    seg = VideoSegmenter(model, mem_every=5, read_backend=backend)
    first = seg.step(data["frames"][0], mask=data["first_mask"])
    assert torch.equal(first.argmax(0), data["first_mask"])
    prob_1 = seg.step(data["frames"][1])
    prob_2 = seg.step(data["frames"][2])
    assert relative_error(prob_1, data["prob_1"]) < 1e-4
    assert relative_error(prob_2, torch.softmax(data["logit_2"], dim=0)) < 1e-4
    assert seg.memory_frames == 2  # frame 0 kept, frame 1 as the temporary slot


def test_memory_encoder_matches_the_official_keys_and_values(golden):
    model, data = golden
    n = int(data["num_objects"])
    one_hot = torch.stack([(data["first_mask"] == i).float() for i in range(1, n + 1)])
    with torch.no_grad():
        keys, values = model.encode_memory(data["frames"][0:1], one_hot)
    assert relative_error(keys, data["memory_key_0"][:, :, 0]) < 1e-4
    assert relative_error(values, data["memory_value_0"][:, :, 0]) < 1e-4


def test_official_checkpoint_variants_load(recipe, tmp_path):
    state = recipe(7)
    reference = load_official_checkpoint(state).state_dict()
    bare = {name.removeprefix("module."): t for name, t in state.items()
            if not name.endswith("num_batches_tracked")}
    path = tmp_path / "STM_weights.pth"
    torch.save(bare, path)
    model = load_official_checkpoint(path)
    assert not model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    wrapped = load_official_checkpoint({"state_dict": state})
    assert torch.equal(wrapped.decoder.predict.weight, reference["decoder.predict.weight"])


def test_wrong_or_truncated_checkpoints_name_the_problem(recipe, tmp_path):
    state = recipe(3)
    truncated = dict(list(state.items())[:-10])
    with pytest.raises(CheckpointError,
                       match=r"10 missing keys \[Decoder\.RF2\.ResFS\.conv1\.weight, "):
        load_official_checkpoint(truncated)
    extra = {**state, "module.Extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \[module\.Extra\.weight\]"):
        load_official_checkpoint(extra)
    reshaped = {**state, "module.KV_M_r4.Key.weight": torch.zeros(64, 1024, 3, 3)}
    with pytest.raises(CheckpointError, match=r"KV_M_r4\.Key\.weight.*\(64, 1024, 3, 3\).*"
                                               r"\(128, 1024, 3, 3\)"):
        load_official_checkpoint(reshaped)
    unrelated = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, unrelated)
    with pytest.raises(CheckpointError, match="558 missing keys|missing keys"):
        load_official_checkpoint(unrelated)
    not_torch = tmp_path / "notes.txt"
    not_torch.write_text("hello")
    with pytest.raises(CheckpointError, match="could not read"):
        load_official_checkpoint(not_torch)


def test_own_checkpoint_round_trip_and_auto_detection(tmp_path):
    torch.manual_seed(0)
    config = STMConfig.small(key_dim=32)
    model = STM(config)
    path = tmp_path / "run" / "model.pt"
    save_checkpoint(model, path, step=12)
    assert not list(path.parent.glob("*.tmp"))
    loaded = load_checkpoint(path)
    assert loaded.config == config and not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.load(path, weights_only=True)["step"] == 12


def test_a_shipped_model_loads_by_name():
    """load_checkpoint takes the names the CLI's --checkpoint takes for the shipped files."""
    from stm_model.network.checkpoint import SHIPPED
    interactive = load_checkpoint("small-real-interactive")
    semi_supervised = load_checkpoint("small-real")
    # the interactive model is small-real fine-tuned on scribbles: the same trunk
    assert interactive.config.interactive and not semi_supervised.config.interactive
    assert interactive.config.backbone == semi_supervised.config.backbone
    assert interactive.config.backbone.startswith("efficientnet_lite")
    by_path = load_checkpoint(SHIPPED["small-real-interactive"])
    for name, tensor in by_path.state_dict().items():
        assert torch.equal(tensor, interactive.state_dict()[name]), name
    with pytest.raises(FileNotFoundError):
        load_checkpoint("small-rael")


def test_small_config_builds_torchvision_resnet_and_checks_arguments():
    model = STM(STMConfig.small())
    from torchvision.models.resnet import BasicBlock
    assert isinstance(model.query_encoder.layer1[0], BasicBlock)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    with pytest.raises(ValueError, match="backbone must be one of"):
        STMConfig(backbone="vgg16")
    with pytest.raises(ValueError, match="3 positive block counts"):
        STMConfig(backbone_layers=(1, 1))


def test_sessions_over_the_synthetic_small_models_warn_once_naming_small_real():
    """load_checkpoint("small") (or its file, or small-interactive) is the synthetic-only
    model: the first session built over it warns once (SyntheticOnlyWarning) naming small-real;
    small-real, the demo's load_small_model and the CLI's acknowledged model do not."""
    import warnings
    from stm_model import InteractiveSession
    from stm_model.demo import load_small_model
    from stm_model.network.checkpoint import SHIPPED, SyntheticOnlyWarning
    frames = torch.rand(2, 3, 32, 48)
    for name in ("small", SHIPPED["small"], str(SHIPPED["small"])):
        model = load_checkpoint(name)
        with pytest.warns(SyntheticOnlyWarning, match=r"the shipped model small was trained on "
                          r'synthetic videos only.*load_checkpoint\("small-real"\)') as caught:
            VideoSegmenter(model)
        assert len([w for w in caught if w.category is SyntheticOnlyWarning]) == 1
        assert caught[0].filename == __file__  # points at the caller's line
        with warnings.catch_warnings():
            warnings.simplefilter("error", SyntheticOnlyWarning)
            VideoSegmenter(model)  # once per model
    with pytest.warns(SyntheticOnlyWarning, match="small-interactive"):
        InteractiveSession(load_checkpoint("small-interactive"), frames, 1)
    with pytest.warns(SyntheticOnlyWarning, match="the shipped model small was"):
        InteractiveSession(load_checkpoint("small"), frames, 1)  # converted: still synthetic
    with warnings.catch_warnings():
        warnings.simplefilter("error", SyntheticOnlyWarning)
        VideoSegmenter(load_checkpoint("small-real"))
        InteractiveSession(load_checkpoint("small-real-interactive"), frames, 1)
        VideoSegmenter(load_small_model())  # the demo's loader, for synthetic video
        load_checkpoint("small")  # loading alone (training, export) does not warn
