"""`stm export --format onnx` and `stm segment --runtime onnxruntime`: the folder written, the
masks equal to the torch run's, the cache export of a named model, and the one-line errors."""
import numpy as np
import pytest
from PIL import Image

from helpers import synthetic_video, write_davis_folder
from stm_model import io as video_io
from stm_model.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _cli(argv):
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(frames folder, first mask) of a two-object synthetic clip, 96 x 128, 8 frames."""
    root = tmp_path_factory.mktemp("clip")
    images, labels = synthetic_video(8, size=(96, 128), objects=2)
    write_davis_folder(root, images, labels)
    return (root / "JPEGImages" / "480p" / "synth",
            root / "Annotations" / "480p" / "synth" / "00000.png")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "small-real"
    assert main(["export", "small-real", str(folder)]) == 0  # no suffix: ONNX
    return folder


def _masks(folder):
    return [video_io.read_mask(path) for path in sorted((folder / "masks").iterdir())]


def test_export_writes_the_folder_and_segment_gives_the_torch_masks(clip, exported, tmp_path,
                                                                    capsys):
    assert (exported / "stm_onnx.json").is_file() and (exported / "read.onnx").is_file()
    frames, mask = clip
    runs = {}
    for runtime, extra in (("torch", ["--memory-dtype", "fp32", "--amp", "fp32"]),
                           ("onnxruntime", ["--checkpoint", str(exported)]),
                           ("whole", ["--checkpoint", str(exported), "--onnx-read", "whole"])):
        out = tmp_path / runtime
        argv = ["segment", str(frames), "--mask", str(mask), "--output", str(out), "--quiet",
                "--overlay", "none", "--runtime", "torch" if runtime == "torch" else
                "onnxruntime", *extra]
        assert _cli(argv) == 0
        runs[runtime] = _masks(out)
    assert "device: onnxruntime (CPU)" in capsys.readouterr().out
    for runtime in ("onnxruntime", "whole"):
        assert len(runs[runtime]) == 8
        differing = sum(int((a != b).sum())
                        for a, b in zip(runs[runtime], runs["torch"], strict=True))
        assert differing <= 8  # a pixel at a tie, at most, per frame
    # resume: the last 3 masks removed, the run continued on the ONNX runner
    out = tmp_path / "onnxruntime"
    for path in sorted((out / "masks").iterdir())[-3:]:
        path.unlink()
    assert _cli(["segment", str(frames), "--mask", str(mask), "--output", str(out), "--quiet",
                 "--overlay", "none", "--runtime", "onnxruntime", "--checkpoint",
                 str(exported), "--resume"]) == 0
    resumed = _masks(out)
    moved = sum(int((a != b).sum())
                for a, b in zip(resumed, runs["onnxruntime"], strict=True))
    assert moved <= 8 * 16


def test_a_named_model_is_exported_once_into_the_cache(clip, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STM_KERNELS_CACHE", str(tmp_path / "cache"))
    frames, mask = clip
    for run in ("first", "second"):
        assert _cli(["segment", str(frames), "--mask", str(mask), "--output",
                     str(tmp_path / run), "--quiet", "--overlay", "none", "--runtime",
                     "onnxruntime", "--checkpoint", "small"]) == 0
        notes = capsys.readouterr().err
        assert ("exporting small to ONNX once" in notes) is (run == "first")
    [folder] = (tmp_path / "cache" / "onnx").iterdir()
    assert folder.name.startswith("stm_small_synthetic-") and (folder / "stm_onnx.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--amp", "bf16"], "--amp applies to the torch runtime"),
    (["--backend", "torch"], "--backend applies to the torch runtime"),
    (["--memory-dtype", "fp16"], "keeps its memory in float32 or int8, not fp16"),
    (["--device", "cuda"], "CPU provider"),
])
def test_torch_only_flags_are_refused_in_one_line(clip, tmp_path, capsys, extra, message):
    frames, mask = clip
    assert _cli(["segment", str(frames), "--mask", str(mask), "--output", str(tmp_path / "o"),
                 "--runtime", "onnxruntime", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_export_errors_are_one_line(tmp_path, capsys, clip):
    assert _cli(["export", "small-real", str(tmp_path / "g"), "--dtype", "fp16"]) == 2
    assert "ONNX graphs are float32" in capsys.readouterr().err
    not_export = tmp_path / "plain"
    not_export.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(not_export / "x.png")
    assert _cli(["export", "small-real", str(not_export)]) == 2
    assert "is not an ONNX export" in capsys.readouterr().err
    frames, mask = clip
    assert _cli(["segment", str(frames.parent.parent.parent), "--runtime", "onnxruntime",
                 "--output", str(tmp_path / "d")]) == 2
    assert "applies to one video" in capsys.readouterr().err
    assert _cli(["segment", str(frames), "--mask", str(mask), "--onnx-read", "whole",
                 "--output", str(tmp_path / "e")]) == 2
    assert "--onnx-read applies with --runtime onnxruntime" in capsys.readouterr().err
