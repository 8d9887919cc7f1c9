"""Checkpoints: the authors' released STM_weights.pth, and the project's own files.

The official state dict (the released STM_weights.pth: Encoder_M, Encoder_Q, KV_M_r4, KV_Q_r4,
Decoder) names modules after the official code; OFFICIAL_NAMES maps each official name prefix
onto this project's module names. It is the only place that knows the official names.
"""
import contextlib
import dataclasses
import os
import pathlib
import reprlib
import warnings
import zipfile
from typing import Any, Optional, Union

import torch

from stm_kernels.options import BACKENDS, SIMILARITIES

from stm_model.io.download import download
from stm_model.io.files import write_atomically
from stm_model.network.stm import STM, STMConfig

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
# Bounds on a checkpoint's STMConfig sizes (the official model: 128, 512, 256; ResNet-101 has
# 23 blocks in layer3): generous, but they keep an untrusted file from asking for a model of
# absurd size before its weights are compared with the config.
CONFIG_LIMITS = {"key_dim": 4096, "value_dim": 8192, "decoder_dim": 4096, "backbone_layers": 64}


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


def load_official_checkpoint(path_or_state_dict: Union[str, os.PathLike, dict],
                             device: Union[str, torch.device] = "cpu") -> STM:
    """The official STM (ResNet-50, keys 128, values 512) with the authors' weights, in eval mode.

    Accepts "official" (the released file, downloaded into the user cache on first use: see
    official_weights), the released `STM_weights.pth` (a path) or its state dict: keys with or
    without the `module.` prefix of nn.DataParallel, with or without BatchNorm
    `num_batches_tracked` buffers.
    A file that is not that checkpoint raises CheckpointError listing missing and unexpected
    keys, or the key whose shape differs.
    """
    if isinstance(path_or_state_dict, str) and path_or_state_dict == OFFICIAL:
        path_or_state_dict = official_weights()
    mapped, unexpected = _renamed_official(_read_state_dict(path_or_state_dict))
    model = STM(STMConfig())
    _load_into(model, mapped, unexpected, source="the official STM checkpoint",
               describe=ours_to_official)
    return model.to(device).eval()


def _renamed_official(state):
    """(state under our names, the official keys that map to none of ours)."""
    mapped, unexpected = {}, []
    for name, tensor in state.items():
        ours = official_to_ours(name)
        if ours is None:
            unexpected.append(name)
        else:
            mapped[ours] = tensor
    return mapped, unexpected


def save_checkpoint(model: STM, path: Union[str, os.PathLike],
                    weights_dtype: Optional[torch.dtype] = None, **extra: Any) -> None:
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
    write_atomically(path, lambda file: torch.save(payload, file))  # the umask's file mode


# The trained models shipped in the package (stm_model/weights), by name.
WEIGHTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "weights"
SHIPPED = {"small-real": WEIGHTS_DIR / "stm_small_real.pt",
           "small-real-interactive": WEIGHTS_DIR / "stm_small_real_interactive.pt",
           "small": WEIGHTS_DIR / "stm_small_synthetic.pt",
           "small-interactive": WEIGHTS_DIR / "stm_small_interactive.pt"}

# The shipped models trained on synthetic video only: their masks do not follow objects in real
# video (the small model scores J&F 0.004 on DAVIS's blackswan), and nothing else says so.
SYNTHETIC_ONLY = ("small", "small-interactive")
# The attribute load_checkpoint sets on such a model: the shipped name, until a session warns.
_SYNTHETIC_MARK = "stm_synthetic_only"


class SyntheticOnlyWarning(UserWarning):
    """A session segments with a shipped model trained on synthetic video only ("small",
    "small-interactive"): its masks do not follow objects in real video."""


def synthetic_only_note(name: str, cli: bool = False) -> str:
    """The one line saying that the shipped model `name` was trained on synthetic video only,
    naming small-real (the default, shipped: works offline) and official; cli: name them as
    `--checkpoint` values rather than load_checkpoint's arguments."""
    real = "--checkpoint small-real" if cli else 'load_checkpoint("small-real")'
    official = "--checkpoint official" if cli else 'load_checkpoint("official")'
    return (f"the shipped model {name} was trained on synthetic videos only and does not follow "
            f"objects in real video; use small-real, the default ({real}: shipped with the "
            f"package, no download, CPU speed), or {official} (the authors' weights, "
            "downloaded once)")


def synthetic_only_name(name_or_path: Union[str, os.PathLike]) -> Optional[str]:
    """The shipped name ("small", "small-interactive") of a synthetic-only model given by that
    name or by its shipped file; None for anything else."""
    if str(name_or_path) in SYNTHETIC_ONLY:
        return str(name_or_path)
    try:
        resolved = pathlib.Path(name_or_path).resolve()
    except (TypeError, OSError):
        return None
    return next((name for name in SYNTHETIC_ONLY if SHIPPED[name].resolve() == resolved), None)


def warn_if_synthetic_only(model: STM, stacklevel: int = 2) -> None:
    """Warn once per model (SyntheticOnlyWarning) if it is a shipped synthetic-only model that
    load_checkpoint loaded and nobody acknowledged (acknowledge_synthetic_only): the sessions
    (VideoSegmenter, BatchSegmenter, InteractiveSession) call it when they are built.

    Why there, and not in load_checkpoint or at the first step on "real-looking" frames: a
    session is where the model segments the user's input, while loading alone also serves
    training (a fine-tune starts from small), export and inspection, where the warning would
    be noise; and no test of the frames' pixels tells a real video from a synthetic one
    reliably, so that trigger would miss real videos or warn on synthetic ones. Which weights
    were loaded is certain; the demo, which segments synthetic video on purpose, acknowledges
    it (stm_model.demo.load_small_model), and the CLI prints the same line as its note."""
    name = getattr(model, _SYNTHETIC_MARK, None)
    if name:
        setattr(model, _SYNTHETIC_MARK, None)
        warnings.warn(synthetic_only_note(name), SyntheticOnlyWarning, stacklevel=stacklevel + 1)


def acknowledge_synthetic_only(model: STM) -> STM:
    """The model, without the synthetic-only warning its sessions would give (for callers
    that segment synthetic video on purpose, or that said so already)."""
    setattr(model, _SYNTHETIC_MARK, None)
    return model


def copy_synthetic_mark(source: STM, target: STM) -> STM:
    """target, marked as synthetic-only when source is (a model converted from it)."""
    setattr(target, _SYNTHETIC_MARK, getattr(source, _SYNTHETIC_MARK, None))
    return target


# The authors' released weights, as the official repository's README links them; fetched on
# first use of the name "official" into the user cache (official_weights).
OFFICIAL = "official"
OFFICIAL_URL = "https://www.dropbox.com/s/mtfxdr93xc3q55i/STM_weights.pth?dl=1"
OFFICIAL_FILE = "STM_weights.pth"
CACHE_ENV = "STM_KERNELS_CACHE"  # overrides the cache folder (default ~/.cache/stm-kernels)


class OfficialWeightsUnavailable(OSError):
    """The official weights could not be downloaded (offline, refused, cut short)."""


def cache_dir() -> pathlib.Path:
    """Where downloaded weights are kept: $STM_KERNELS_CACHE, else $XDG_CACHE_HOME/stm-kernels,
    else ~/.cache/stm-kernels (the XDG base-directory convention torch.hub and pip follow)."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path("~/.cache").expanduser()
    return pathlib.Path(base) / "stm-kernels"


def official_weights(url: Optional[str] = None, show_progress: bool = True) -> pathlib.Path:
    """The path of the authors' released STM_weights.pth in the cache, downloaded on first use.

    The download goes to STM_weights.pth.part (continued after an interruption), is checked
    against the official key list and shapes, and only then renamed to STM_weights.pth, so the
    cache never holds a partial or foreign file under that name. A file that arrives complete
    but is not the official checkpoint is deleted (CheckpointError); a download that cannot
    complete raises OfficialWeightsUnavailable, one line naming the URL, the path to put the
    file at by hand, and small-real (the default model, shipped: it works offline). A refused
    or failed download leaves no lock file, nor an empty part file; a part that received bytes
    is kept for the next attempt to continue."""
    url = url or OFFICIAL_URL
    path = cache_dir() / OFFICIAL_FILE
    if path.is_file():
        return path
    partial = path.with_name(path.name + ".part")
    try:
        with _locked(path.with_name(path.name + ".lock")):  # one download per cache
            if path.is_file():  # another process finished it while this one waited
                return path
            download(url, partial, show_progress=show_progress, description=OFFICIAL_FILE)
            try:
                check_official_file(partial)
            except CheckpointError as error:
                partial.unlink(missing_ok=True)
                raise CheckpointError(f"the file downloaded from {url} is not the official "
                                      f"STM checkpoint and was deleted ({error})") from None
            os.replace(partial, path)
    except OSError as error:  # DownloadError, or the cache folder cannot be written
        kept = " (the part received is kept: run again to continue)" if partial.exists() else ""
        raise OfficialWeightsUnavailable(
            f"cannot download the official STM weights from {url}: {error}{kept}; download "
            f"the file by hand to {path}, or use small-real, the default model shipped with "
            "the package (--checkpoint small-real, load_checkpoint('small-real')), which "
            "needs no download"
        ) from None
    return path


@contextlib.contextmanager
def _locked(lock_path):
    """An exclusive lock on lock_path (fcntl.flock; a no-op where fcntl is absent), so that
    processes started together (torchrun ranks) download once. The lock file is removed on
    release (success or failure): the cache keeps no empty STM_weights.pth.lock. A process
    that waited on a file removed meanwhile holds a lock nobody else sees, so after acquiring
    it checks that lock_path is still its file, and starts over on the new one if not."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    while True:
        handle = open(lock_path, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            current = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path))
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()  # released by the holder that removed it: lock the new file
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while held: a waiter then sees it gone
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def check_official_file(path: Union[str, os.PathLike]) -> None:
    """CheckpointError unless the file holds the official STM state dict: the official keys
    (with or without 'module.'), each with its shape. Reads the file memory-mapped: the check
    costs no copy of the weights."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise CheckpointError(f"could not read {os.fspath(path)!r} as a PyTorch checkpoint: "
                              f"{_why_unreadable(path, error)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{os.fspath(path)!r} is not a state dict (name -> tensor)")
    mapped, unexpected = _renamed_official(state)
    with torch.device("meta"):
        skeleton = STM(STMConfig())
    _check_state(skeleton.state_dict(), mapped, unexpected, "the file", ours_to_official)


def resolve_checkpoint(name_or_path: Union[str, os.PathLike],
                       show_progress: bool = True) -> pathlib.Path:
    """The file of a checkpoint named by a shipped model's name ("small-real",
    "small-real-interactive", "small", "small-interactive"), by "official" (the authors'
    weights: official_weights, downloaded on first use) or by a path; FileNotFoundError naming
    the choices when it is none of them."""
    if str(name_or_path) in SHIPPED:
        return SHIPPED[str(name_or_path)]
    if str(name_or_path) == OFFICIAL:
        return official_weights(show_progress=show_progress)
    path = pathlib.Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint {str(name_or_path)!r}: give a file, "
                                f"{OFFICIAL} (the authors' weights, downloaded once), or one of "
                                f"the shipped models {', '.join(SHIPPED)}")
    return path


def load_checkpoint(path_or_payload: Union[str, os.PathLike, dict],
                    device: Union[str, torch.device] = "cpu") -> STM:
    """A model from one of this project's checkpoints or from the official one (detected by
    content), in eval mode; a shipped model's name ("small-real", "small-real-interactive",
    "small", "small-interactive") stands for its file.

    "small" and "small-interactive" (by name or by their shipped files) were trained on
    synthetic video only: the first session built over such a model warns once
    (SyntheticOnlyWarning, see warn_if_synthetic_only); "small-real" is the model for real
    video.

    The file is untrusted input: its config is checked (checked_config) and its weights are
    compared with the model that config describes, built on the meta device (no memory),
    before the model is built; any mismatch is a CheckpointError."""
    synthetic = (synthetic_only_name(path_or_payload)
                 if isinstance(path_or_payload, (str, os.PathLike)) else None)
    if isinstance(path_or_payload, str) and path_or_payload in SHIPPED:
        path_or_payload = SHIPPED[path_or_payload]
    payload = _read(path_or_payload)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        source = "the stm-kernels checkpoint"
        if isinstance(path_or_payload, (str, os.PathLike)):
            source += f" {os.fspath(path_or_payload)}"
        config = checked_config(payload.get("config"), source)
        state = payload.get("state_dict")
        if not isinstance(state, dict) or not all(
                isinstance(name, str) and isinstance(t, torch.Tensor) for name, t in state.items()):
            raise CheckpointError(f"{source}: 'state_dict' must map names to tensors")
        with torch.device("meta"):
            skeleton = STM(config)
        _check_state(skeleton.state_dict(), state, [], source)
        model = STM(config)
        _load_into(model, state, [], source=source)
        setattr(model, _SYNTHETIC_MARK, synthetic)
        return model.to(device).eval()
    return load_official_checkpoint(payload, device)


def checked_config(config, source="the checkpoint"):
    """The STMConfig of a checkpoint's "config" dict, or CheckpointError naming the problem:
    not a dict, unknown keys, a value of the wrong type (an int for the sizes, a bool for the
    flags, a string for the names), an unknown backbone, similarity or read backend, or a size
    beyond CONFIG_LIMITS. pretrained_backbone is ignored (the weights come from the file;
    building must not download anything)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: 'config' must be a dict of STMConfig fields; got "
                              f"{type(config).__name__}")
    fields = [field.name for field in dataclasses.fields(STMConfig)]
    unknown = sorted(map(repr, set(config) - set(fields)))
    if unknown:
        raise CheckpointError(f"{source}: unknown config keys {', '.join(unknown)} (known: "
                              f"{', '.join(fields)})")
    for name, value in config.items():
        problem = _config_problem(name, value)
        if problem:
            raise CheckpointError(f"{source}: config {name}={reprlib.repr(value)}: {problem}")
    try:
        return STMConfig(**{**config, "pretrained_backbone": False})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: invalid config: {error}") from error


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _config_problem(name, value):
    """What is wrong with one config value, or None."""
    if name in ("key_dim", "value_dim", "decoder_dim"):
        if not _is_int(value):
            return f"must be an int; got {type(value).__name__}"
        if not 1 <= value <= CONFIG_LIMITS[name]:
            return f"must be in 1..{CONFIG_LIMITS[name]}"
    elif name == "backbone_layers":
        if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 3 or
                                  not all(_is_int(n) for n in value)):
            return "must be None or 3 ints (blocks in layer1..layer3)"
        if value is not None and not all(1 <= n <= CONFIG_LIMITS[name] for n in value):
            return f"block counts must be in 1..{CONFIG_LIMITS[name]}"
    elif name == "internal_size":
        if value is not None and (not _is_int(value) or not 16 <= value <= 8192):
            return "must be None or an int in 16..8192 (pixels of the shorter side)"
    elif name in ("pretrained_backbone", "interactive"):
        if not isinstance(value, bool):
            return f"must be a bool; got {type(value).__name__}"
    elif name == "backbone":
        if not isinstance(value, str):
            return f"must be a string; got {type(value).__name__}"
    elif name == "similarity" and value not in SIMILARITIES:
        return f"must be one of {', '.join(SIMILARITIES)}"
    elif name == "read_backend" and value not in BACKENDS:
        return f"must be one of {', '.join(BACKENDS)}"
    return None


def _read(path_or_payload):
    if isinstance(path_or_payload, (str, os.PathLike)):
        try:
            return torch.load(path_or_payload, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as error:
            raise CheckpointError(f"could not read {os.fspath(path_or_payload)!r} as a PyTorch "
                                  f"checkpoint: {_why_unreadable(path_or_payload, error)}"
                                  ) from error
    return path_or_payload


def _why_unreadable(path, error):
    """Why torch.load failed, in a few words (its own message on weights_only runs to a
    paragraph of advice)."""
    with open(path, "rb") as file:
        head = file.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # neither a zip nor a pickle
        return "it is not a file torch.save writes (a zip archive or a pickle)"
    if "Weights only load failed" in str(error):
        return ("it holds Python objects besides tensors, which are not loaded (only "
                "checkpoints of tensors and plain values are)")
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"


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
    _check_state(expected, state, unexpected, source, describe)
    complete = {**{n: t for n, t in expected.items() if n.endswith("num_batches_tracked")},
                **state}
    model.load_state_dict(complete, strict=True)


def _check_state(expected, state, unexpected, source, describe=str):
    """CheckpointError unless state has the keys (num_batches_tracked optional) and shapes of
    the expected state dict (which may live on the meta device)."""
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


def _names(names):
    shown = ", ".join(names[:_LISTED])
    return f"[{shown}{', ...' if len(names) > _LISTED else ''}]"
