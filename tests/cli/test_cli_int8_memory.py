"""--memory-dtype int8 / fp8 (an 8-bit memory) in `stm segment` (resume, both directions,
offload, objects entering late), `stm segment-dataset`, `stm interactive`,
`stm interactive-eval` and `stm annotate`; what refuses it."""
import json

import numpy as np
import pytest
import torch

from helpers import synthetic_video, write_davis_folder, write_frames, write_late_object_clip
from stm_model import io as video_io
from stm_model.cli import main
from stm_model.inference import batch_segmenter, session as session_module
from stm_model.interactive import scribbles as S

FRAMES = 12


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Frames, masks (frame 0 holds object 1, frame 4 brings object 2) and later_masks
    (helpers.write_late_object_clip)."""
    return write_late_object_clip(tmp_path_factory.mktemp("clip"), FRAMES)


@pytest.fixture
def bank_dtypes(monkeypatch):
    """The storage dtype of every MemoryBank a session makes, and of every BatchedMemory."""
    seen = []

    def recording(cls):
        def make(*args, **kwargs):
            seen.append(kwargs["dtype"])
            return cls(*args, **kwargs)
        return make
    monkeypatch.setattr(session_module, "MemoryBank", recording(session_module.MemoryBank))
    monkeypatch.setattr(batch_segmenter, "BatchedMemory",
                        recording(batch_segmenter.BatchedMemory))
    return seen


def _segment(clip, output, *extra, masks="masks"):
    return main(["segment", str(clip / "frames"), "--masks", str(clip / masks), "--output",
                 str(output), "--mem-every", "3", "--quiet", "--overlay", "none", *extra])


def _masks(folder):
    return {p.relative_to(folder).as_posix(): video_io.read_mask(p)
            for p in sorted(folder.rglob("*.png"))}


def _agreement(actual, expected):
    assert actual.keys() == expected.keys() and actual
    return np.mean([(actual[name] == expected[name]).mean() for name in expected])


@pytest.mark.parametrize("extra, masks", [
    ((), "masks"),                                          # object 2 enters on frame 4
    (("--both-directions", "--offload"), "later_masks")])   # 4..11, then 3..0
def test_segment_with_int8_memory(clip, tmp_path, bank_dtypes, extra, masks):
    """Masks of an int8 memory within 0.5% of the pixels of a float32 memory's (measured, AMD
    EPYC, 2026-11-29: 1 pixel of 12 64x96 frames differs, 57 (0.08%) both ways offloaded);
    every bank int8."""
    assert _segment(clip, tmp_path / "fp32", "--memory-dtype", "fp32", *extra,
                    masks=masks) == 0
    del bank_dtypes[:]
    assert _segment(clip, tmp_path / "int8", "--memory-dtype", "int8", *extra,
                    masks=masks) == 0
    assert bank_dtypes and set(bank_dtypes) == {torch.int8}
    assert _agreement(_masks(tmp_path / "int8"), _masks(tmp_path / "fp32")) >= 0.995


def test_resume_with_int8_memory(clip, tmp_path, monkeypatch, capsys):
    """Ctrl-C after 6 masks, then --resume with the same --memory-dtype int8: the memory is
    rebuilt (quantised) from the masks written and the rest agrees with an uninterrupted int8
    run; resuming with another --memory-dtype is refused, naming it."""
    full = tmp_path / "full"
    assert _segment(clip, full, "--memory-dtype", "int8") == 0
    output = tmp_path / "out"
    real, written = video_io.write_mask, []

    def write_then_stop(path, labels):
        if len(written) == 6:
            raise KeyboardInterrupt
        written.append(path)
        return real(path, labels)
    monkeypatch.setattr(video_io, "write_mask", write_then_stop)
    assert _segment(clip, output, "--memory-dtype", "int8") == 130
    monkeypatch.setattr(video_io, "write_mask", real)
    capsys.readouterr()
    assert _segment(clip, output, "--memory-dtype", "fp32", "--resume") == 2
    assert "--memory-dtype 'int8' then, 'fp32' now" in capsys.readouterr().err
    assert _segment(clip, output, "--memory-dtype", "int8", "--resume") == 0
    assert "resuming: 6 of 12 masks" in capsys.readouterr().err
    assert _agreement(_masks(output / "masks"), _masks(full / "masks")) > 0.99


def test_segment_dataset_with_int8_memory(tmp_path, bank_dtypes):
    """Two sequences batched with int8 memory (a BatchedMemory of int8), masks within 0.5%
    of the pixels of the float32 memory's (measured: 10 pixels of 14 48x64 frames differ)."""
    for index, name in enumerate(("a", "b")):
        images, labels = synthetic_video(6 + 2 * index, size=(48, 64), seed=30 + index)
        write_davis_folder(tmp_path / "davis", images, labels, name=name)
    outputs = {}
    for dtype in ("fp32", "int8"):
        outputs[dtype] = tmp_path / dtype
        assert main(["segment-dataset", str(tmp_path / "davis"), "--output",
                     str(outputs[dtype]), "--memory-dtype", dtype, "--quiet"]) == 0
    assert bank_dtypes == [torch.float32, torch.int8]
    assert _agreement(_masks(outputs["int8"]), _masks(outputs["fp32"])) >= 0.995


def _scribble_rounds(tmp_path, frames=4):
    folder = tmp_path / "frames"
    labels = write_frames(folder, frames, (32, 48))
    scribbles = S.empty_scribbles(frames)
    scribbles["scribbles"][1] = S.synthesize_strokes(labels[1], np.zeros_like(labels[1]), 2)
    path = tmp_path / "r1.json"
    path.write_text(json.dumps(scribbles))
    return folder, path


def test_interactive_with_int8_memory(tmp_path, bank_dtypes, capsys):
    folder, scribbles = _scribble_rounds(tmp_path)
    runs = {}
    for dtype in ("fp32", "int8"):
        runs[dtype] = tmp_path / dtype
        assert main(["interactive", str(folder), "--scribbles", str(scribbles), "--output",
                     str(runs[dtype]), "--overlay", "none", "--quiet", "--memory-dtype",
                     dtype]) == 0
    assert bank_dtypes == [torch.float32, torch.int8]
    assert _agreement(_masks(runs["int8"]), _masks(runs["fp32"])) >= 0.995


def test_interactive_eval_takes_int8_memory(tmp_path, bank_dtypes, capsys):
    images, labels = synthetic_video(4, size=(32, 48), seed=9)
    write_davis_folder(tmp_path / "davis", images, labels, name="synth")
    output = tmp_path / "eval"
    assert main(["interactive-eval", str(tmp_path / "davis"), "--rounds", "1", "--output",
                 str(output), "--quiet", "--memory-dtype", "int8"]) == 0
    assert bank_dtypes and set(bank_dtypes) == {torch.int8}
    assert json.loads((output / "interactive_eval.json").read_text())["memory_dtype"] == "int8"


def test_annotate_takes_int8_memory(tmp_path, monkeypatch, bank_dtypes):
    """`stm annotate --memory-dtype int8` hands it to the server, whose sessions store int8."""
    from stm_model.annotate.server import AnnotationServer
    from stm_model.commands import annotate as annotate_command
    folder = tmp_path / "frames"
    write_frames(folder, 4, (32, 48))
    made = []

    def server(*args, **kwargs):
        made.append(kwargs)
        raise KeyboardInterrupt  # stop before serving
    monkeypatch.setattr(annotate_command, "AnnotationServer", server)
    assert main(["annotate", str(folder), "--output", str(tmp_path / "out"), "--port", "0",
                 "--memory-dtype", "int8"]) == 130
    assert made[0]["memory_dtype"] == "int8"
    monkeypatch.undo()
    real = AnnotationServer(folder, tmp_path / "out2", port=0, memory_dtype="int8")
    try:
        session = real._replayed()
    finally:
        real._httpd.server_close()
    assert session.bank.keys.dtype == torch.int8


def test_the_onnx_runner_refuses_an_fp8_memory_in_one_line(clip, tmp_path, capsys):
    assert _segment(clip, tmp_path / "o", "--memory-dtype", "fp8", "--runtime",
                    "onnxruntime") == 2
    err = capsys.readouterr().err
    assert "the ONNX runner keeps its memory in float32 or int8, not fp8" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_segment_on_the_onnx_runner_with_int8_memory(clip, tmp_path, monkeypatch, capsys):
    """`stm export --memory-dtype int8` writes read graphs that take an int8 memory; `stm
    segment --runtime onnxruntime` runs them, given the folder or a model name (exported once
    into the cache per memory dtype), with the masks of the torch run's int8 memory; another
    memory asked of that folder is refused in one line naming its manifest, and so is
    --memory-dtype int8 for a weights file."""
    from stm_model.commands.common import DEFAULT_CHECKPOINT
    folder = tmp_path / "export"
    assert main(["export", DEFAULT_CHECKPOINT, str(folder), "--memory-dtype", "int8"]) == 0
    assert json.loads((folder / "stm_onnx.json").read_text())["memory_dtype"] == "int8"
    assert "int8 memory" in capsys.readouterr().out
    assert _segment(clip, tmp_path / "torch", "--memory-dtype", "int8", "--amp", "fp32") == 0
    assert _segment(clip, tmp_path / "onnx", "--runtime", "onnxruntime", "--checkpoint",
                    str(folder)) == 0
    assert _agreement(_masks(tmp_path / "onnx"), _masks(tmp_path / "torch")) >= 0.995
    monkeypatch.setenv("STM_KERNELS_CACHE", str(tmp_path / "cache"))
    assert _segment(clip, tmp_path / "named", "--runtime", "onnxruntime",
                    "--memory-dtype", "int8") == 0
    [cached] = (tmp_path / "cache" / "onnx").iterdir()
    assert cached.name.endswith("-int8")
    assert json.loads((cached / "stm_onnx.json").read_text())["memory_dtype"] == "int8"
    assert _agreement(_masks(tmp_path / "named"), _masks(tmp_path / "onnx")) == 1.0
    capsys.readouterr()
    assert _segment(clip, tmp_path / "o", "--runtime", "onnxruntime", "--checkpoint",
                    str(folder), "--memory-dtype", "fp32") == 2
    err = capsys.readouterr().err
    assert "stm_onnx.json" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert main(["export", DEFAULT_CHECKPOINT, str(tmp_path / "w.pt"),
                 "--memory-dtype", "int8"]) == 2
    assert "--memory-dtype applies to ONNX exports" in capsys.readouterr().err
