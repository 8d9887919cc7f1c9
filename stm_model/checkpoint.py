"""Checkpoints: the authors' released STM_weights.pth, and the project's own files.

The official state dict (../shared/reference/stm_official_state_dict.txt) names modules after
the official code; OFFICIAL_NAMES maps each official name prefix onto this project's module
names. It is the only place that knows the official names.
"""
import dataclasses
import os
import pathlib
import tempfile

import torch

from .network import STM, STMConfig

# (official prefix, our prefix): a key maps through the first entry whose prefix it starts
# with, so more specific prefixes come first (conv1_m before conv1).
OFFICIAL_NAMES = []
for _official, _ours in (("Encoder_M", "memory_encoder"), ("Encoder_Q", "query_encoder")):
    OFFICIAL_NAMES += [
        (f"{_official}.conv1_m.", f"{_ours}.mask_conv."),
        (f"{_official}.conv1_o.", f"{_ours}.other_conv."),
        (f"{_official}.conv1.", f"{_ours}.conv1."),
        (f"{_official}.bn1.", f"{_ours}.bn1."),
        (f"{_official}.res2.", f"{_ours}.layer1."),
        (f"{_official}.res3.", f"{_ours}.layer2."),
        (f"{_official}.res4.", f"{_ours}.layer3."),
        (f"{_official}.mean", f"{_ours}.mean"),
        (f"{_official}.std", f"{_ours}.std"),
    ]
OFFICIAL_NAMES += [
    ("KV_M_r4.Key.", "memory_key_value.key."),
    ("KV_M_r4.Value.", "memory_key_value.value."),
    ("KV_Q_r4.Key.", "query_key_value.key."),
    ("KV_Q_r4.Value.", "query_key_value.value."),
    ("Decoder.convFM.", "decoder.fuse."),
    ("Decoder.ResMM.", "decoder.res."),
    ("Decoder.pred2.", "decoder.predict."),
]
for _official, _ours in (("Decoder.RF3", "decoder.refine3"), ("Decoder.RF2", "decoder.refine2")):
    OFFICIAL_NAMES += [
        (f"{_official}.convFS.", f"{_ours}.skip_conv."),
        (f"{_official}.ResFS.", f"{_ours}.skip_res."),
        (f"{_official}.ResMM.", f"{_ours}.merge_res."),
    ]

FORMAT = "stm-kernels/1"
_LISTED = 8  # keys named in an error message before "..."


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (missing/unexpected keys, shapes)."""


def official_to_ours(name):
    """Our name for an official state-dict key (with or without 'module.'), or None."""
    name = name.removeprefix("module.")
    for official, ours in OFFICIAL_NAMES:
        if name.startswith(official) and (official.endswith(".") or name == official):
            return ours + name[len(official):]
    return None


def ours_to_official(name):
    """The official name (without 'module.') of one of our state-dict keys, or the name itself."""
    for official, ours in OFFICIAL_NAMES:
        if name.startswith(ours) and (ours.endswith(".") or name == ours):
            return official + name[len(ours):]
    return name


def load_official_checkpoint(path_or_state_dict, device="cpu"):
    """The official STM (ResNet-50, keys 128, values 512) with the authors' weights, in eval mode.

    Accepts the released `STM_weights.pth` (a path) or its state dict: keys with or without the
    `module.` prefix of nn.DataParallel, with or without BatchNorm `num_batches_tracked` buffers.
    A file that is not that checkpoint raises CheckpointError listing missing and unexpected
    keys, or the key whose shape differs.
    """
    state = _read_state_dict(path_or_state_dict)
    mapped, unexpected = {}, []
    for name, tensor in state.items():
        ours = official_to_ours(name)
        if ours is None:
            unexpected.append(name)
        else:
            mapped[ours] = tensor
    model = STM(STMConfig())
    _load_into(model, mapped, unexpected, source="the official STM checkpoint",
               describe=ours_to_official)
    return model.to(device).eval()


def save_checkpoint(model, path, weights_dtype=None, **extra):
    """Write the model (config + weights, and any extra entries such as optimiser state) to
    path atomically: a crash mid-write leaves the previous file intact. weights_dtype (e.g.
    torch.float16) stores floating-point weights in that dtype (a smaller file); loading casts
    them back to the model's dtype."""
    state = model.state_dict()
    if weights_dtype is not None:
        state = {name: t.to(weights_dtype) if t.is_floating_point() else t
                 for name, t in state.items()}
    payload = {"format": FORMAT, "config": dataclasses.asdict(model.config),
               "state_dict": state, **extra}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path_or_payload, device="cpu"):
    """A model from one of this project's checkpoints or from the official one (detected by
    content), in eval mode."""
    payload = _read(path_or_payload)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        model = STM(STMConfig(**payload["config"]))
        _load_into(model, payload["state_dict"], [], source="the stm-kernels checkpoint")
        return model.to(device).eval()
    return load_official_checkpoint(payload, device)


def _read(path_or_payload):
    if isinstance(path_or_payload, (str, os.PathLike)):
        try:
            return torch.load(path_or_payload, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(
                f"could not read {os.fspath(path_or_payload)!r} as a PyTorch checkpoint: "
                f"{type(error).__name__}: {error}") from error
    return path_or_payload


def _read_state_dict(path_or_state_dict):
    state = _read(path_or_state_dict)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"expected a state dict (name -> tensor); got {type(state).__name__}")
    return state


def _load_into(model, state, unexpected, source, describe=str):
    """Load state (our names) strictly, num_batches_tracked optional; errors name keys as
    describe(name) (the official names for the official checkpoint)."""
    expected = model.state_dict()
    missing = [describe(name) for name in expected if name not in state
               and not name.endswith("num_batches_tracked")]
    unexpected = list(unexpected) + [describe(name) for name in state if name not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model: {len(missing)} missing keys "
            f"{_names(missing)}, {len(unexpected)} unexpected keys {_names(unexpected)}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: {describe(name)!r} has shape {tuple(tensor.shape)} but the model "
                f"expects {tuple(expected[name].shape)}")
    complete = {**{n: t for n, t in expected.items() if n.endswith("num_batches_tracked")},
                **state}
    model.load_state_dict(complete, strict=True)


def _names(names):
    shown = ", ".join(names[:_LISTED])
    return f"[{shown}{', ...' if len(names) > _LISTED else ''}]"
