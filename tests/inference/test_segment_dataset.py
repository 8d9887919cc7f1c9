"""`stm segment-dataset`: a DAVIS-format folder K sequences at a time, resumable, over two
gloo processes; and its pieces (listing, balanced split)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import SHARED, synthetic_video, write_davis_folder
from stm_model import VideoSegmenter
from stm_model import io as video_io
from stm_model.inference.batch_segmenter import BatchSegmenter
from stm_model.cli import main
from stm_model.inference.dataset_runs import balanced_split, list_sequences
from stm_model.demo import WEIGHTS, load_small_model

# name: (frames, objects, size); "wide" has another frame size (it waits for its own batch)
SEQUENCES = {"alpha": (6, 2, (48, 80)), "bravo": (9, 1, (48, 80)), "charlie": (4, 3, (48, 80)),
             "wide": (5, 2, (40, 96))}
OPTIONS = ["--checkpoint", str(WEIGHTS), "--mem-every", "2", "--quiet"]
# the network in float32, as _alone's VideoSegmenter (without it, bf16 autocast on a CPU with
# bf16 dot products): for the runs compared with _alone, or with single_run
FLOAT32 = ["--amp", "fp32"]
DAVIS = SHARED / "data" / "davis2016-val"


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("davis")
    for index, (name, (frames, objects, size)) in enumerate(SEQUENCES.items()):
        images, labels = synthetic_video(frames, size=size, seed=20 + index, objects=objects)
        write_davis_folder(root, images, labels, name=name)
    return root


@pytest.fixture(scope="module")
def single_run(davis_root, tmp_path_factory):
    """Output folder of one single-process run, 3 sequences at a time (with --eval)."""
    output = tmp_path_factory.mktemp("single") / "out"
    assert main(["segment-dataset", str(davis_root), "--output", str(output),
                 "--batch-size", "3", "--eval", *OPTIONS, *FLOAT32]) == 0
    return output


def _masks(folder):
    return {path.relative_to(folder).as_posix(): video_io.read_mask(path)
            for path in sorted(folder.glob("*/*.png"))}


def _alone(root, name):
    """Labels of a sequence segmented alone by VideoSegmenter from its first annotation."""
    model = load_small_model()
    segmenter = VideoSegmenter(model, mem_every=2)
    frames = video_io.list_frames(root / "JPEGImages" / "480p" / name)
    first = video_io.read_mask(root / "Annotations" / "480p" / name / "00000.png")
    labels = []
    for t, path in enumerate(frames):
        frame = video_io.to_tensor(video_io.load_image(path))
        probs = segmenter.step(frame, mask=torch.from_numpy(first) if t == 0 else None)
        labels.append(segmenter.labels(probs).numpy())
    return labels


def test_every_sequence_is_segmented_as_alone_and_scored(davis_root, single_run, capsys):
    masks = _masks(single_run)
    assert len(masks) == sum(frames for frames, _, _ in SEQUENCES.values())
    for name, (frames, _, size) in SEQUENCES.items():
        alone = _alone(davis_root, name)
        for t in range(frames):
            ours = masks[f"{name}/{t:05d}.png"]
            assert ours.shape == size
            assert (ours != alone[t]).mean() < 1e-3, (name, t)  # (float32 near-ties only)
    summary = json.loads((single_run / "segment_summary.json").read_text())
    assert sorted(s["name"] for s in summary["sequences"]) == sorted(SEQUENCES)
    assert summary["skipped"] == [] and summary["batch_size"] == 3
    assert {s["name"]: s["objects"] for s in summary["sequences"]} == {
        name: objects for name, (_, objects, _) in SEQUENCES.items()}
    # bravo's last frame (8) read frames 0, 2, 4, 6 (mem_every=2) and 7 (the previous)
    assert {s["name"]: s["memory_frames"] for s in summary["sequences"]}["bravo"] == 5
    assert (single_run / "global_results.csv").exists()  # --eval
    assert not (single_run / ".incomplete").exists()


def test_interrupted_run_redoes_the_unfinished_sequence_and_skips_the_rest(
        davis_root, single_run, tmp_path, monkeypatch, capsys):
    """One sequence at a time (by size, longest first: wide, bravo, alpha, charlie), killed
    in the middle of the third: the first two are complete and skipped on the next run, the
    third is redone; the result equals an uninterrupted run."""
    output = tmp_path / "out"
    step, calls = BatchSegmenter.step, [0]

    def killed_at_step_17(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 17:  # wide: steps 1-5, bravo: 6-14, alpha: 15-20
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(BatchSegmenter, "step", killed_at_step_17)
    capsys.readouterr()
    assert main(["segment-dataset", str(davis_root), "--output", str(output), "--batch-size",
                 "1", *OPTIONS, *FLOAT32]) == 130  # Ctrl-C: one line, no traceback
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "stm segment-dataset: interrupted: the sequences completed are kept in the output; run "
        "the same command again to resume")
    monkeypatch.setattr(BatchSegmenter, "step", step)
    assert sorted(p.name for p in output.iterdir() if p.is_dir()) == [".incomplete", "bravo",
                                                                      "wide"]
    assert (output / ".incomplete" / "alpha").is_dir()
    written = {p: p.stat().st_mtime_ns for p in output.glob("[bw]*/*.png")}
    capsys.readouterr()
    assert main(["segment-dataset", str(davis_root), "--output", str(output), "--batch-size",
                 "1", *OPTIONS, *FLOAT32]) == 0
    assert "2 sequences segmented, 2 already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in output.glob("[bw]*/*.png")} == written
    summary = json.loads((output / "segment_summary.json").read_text())
    assert summary["skipped"] == ["bravo", "wide"]
    assert not (output / ".incomplete").exists()
    single, resumed = _masks(single_run), _masks(output)
    assert single.keys() == resumed.keys()
    assert all((single[k] != resumed[k]).mean() < 1e-3 for k in single)


def test_two_gloo_processes_write_the_masks_of_one_process(davis_root, single_run, tmp_path):
    output = tmp_path / "out"
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "stm_model", "segment-dataset", str(davis_root), "--output", str(output),
         "--batch-size", "2", "--device", "cpu", *OPTIONS, *FLOAT32],
        capture_output=True, text=True, env=environment, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("| all |") == 1  # rank 0 prints the table
    summary = json.loads((output / "segment_summary.json").read_text())
    assert summary["world_size"] == 2 and [r["rank"] for r in summary["ranks"]] == [0, 1]
    frames = {rank: sum(s["frames"] for s in summary["sequences"] if s["rank"] == rank)
              for rank in (0, 1)}
    assert frames == {0: 13, 1: 11}  # bravo + charlie | alpha + wide
    single, distributed = _masks(single_run), _masks(output)
    assert single.keys() == distributed.keys()
    assert all((single[k] != distributed[k]).mean() < 1e-3 for k in single)


def test_segment_given_a_davis_root_and_every_annotation_as_input(davis_root, tmp_path):
    """`stm segment ROOT` runs segment-dataset; with --masks all every frame's annotation is
    an input, so the output is the annotations themselves, at the frames' size however small
    --size is."""
    output = tmp_path / "out"
    assert main(["segment", str(davis_root), "--output", str(output), "--batch-size", "2",
                 "--overlay", "none", *OPTIONS]) == 0
    assert len(_masks(output)) == sum(frames for frames, _, _ in SEQUENCES.values())
    given = tmp_path / "given"
    assert main(["segment-dataset", str(davis_root), "--output", str(given), "--masks", "all",
                 "--size", "32", "--sequences", "alpha", "wide", *OPTIONS]) == 0
    for key, labels in _masks(given).items():
        truth = video_io.read_mask(davis_root / "Annotations" / "480p" / key)
        assert np.array_equal(labels, truth), key


def test_segment_a_davis_root_at_a_shorter_side(davis_root, tmp_path):
    """`stm segment DAVIS_ROOT --size PIXELS`: --size is the shorter side the network works at,
    as for one video; each sequence is resized by its own aspect ratio, masks are written at
    the frames' size."""
    output = tmp_path / "out"
    assert main(["segment", str(davis_root), "--output", str(output), "--size", "24",
                 *OPTIONS]) == 0
    summary = json.loads((output / "segment_summary.json").read_text())
    assert summary["max_internal_size"] == 24
    sizes = {s["name"]: (s["size"], s["segmented_size"]) for s in summary["sequences"]}
    assert sizes == {**{name: ([48, 80], [24, 40]) for name in ("alpha", "bravo", "charlie")},
                     "wide": ([40, 96], [24, 58])}
    for key, labels in _masks(output).items():
        truth = video_io.read_mask(davis_root / "Annotations" / "480p" / key)
        assert labels.shape == truth.shape


def test_bad_input_is_a_clear_error(davis_root, tmp_path, capsys):
    broken = tmp_path / "broken"
    frames, labels = synthetic_video(3, size=(32, 32), seed=1)
    write_davis_folder(broken, frames, labels, name="nofirst")
    (broken / "Annotations" / "480p" / "nofirst" / "00000.png").unlink()
    assert main(["segment-dataset", str(broken), "--output", str(tmp_path / "o"),
                 *OPTIONS]) == 2
    assert "sequence nofirst: no annotation of its first frame" in capsys.readouterr().err
    assert main(["segment-dataset", str(davis_root), "--output", str(tmp_path / "o"),
                 "--batch-size", "0", *OPTIONS]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    assert main(["segment-dataset", str(davis_root), "--output", str(tmp_path / "o"),
                 "--sequences", "zulu", *OPTIONS]) == 2
    assert "sequences ['zulu'] are not in" in capsys.readouterr().err
    assert main(["segment", str(davis_root), "--mask", "x.png", *OPTIONS]) == 2
    assert "is a DAVIS-format root" in capsys.readouterr().err


def test_balanced_split_evens_the_frame_counts(davis_root):
    sequences = list_sequences(davis_root)
    assert [s.name for s in sequences] == sorted(SEQUENCES)
    assert [s.size for s in sequences] == [SEQUENCES[s.name][2] for s in sequences]
    shares = balanced_split(sequences, 2)
    assert [[s.name for s in share] for share in shares] == [["bravo", "charlie"],
                                                             ["alpha", "wide"]]
    assert balanced_split(sequences, 5)[4] == []


@pytest.mark.skipif(not DAVIS.exists(), reason="../shared/data is absent")
def test_real_davis_sequence_at_reduced_size(tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["segment-dataset", str(DAVIS), "--output", str(output), "--sequences",
                 "blackswan", "--size", "96", "--eval", *OPTIONS]) == 0
    masks = sorted((output / "blackswan").glob("*.png"))
    assert len(masks) == 50 and video_io.read_mask(masks[-1]).shape == (480, 854)
    printed = capsys.readouterr().out
    assert "blackswan_1" in printed and "| all |" in printed
    truth = video_io.read_mask(DAVIS / "Annotations" / "480p" / "blackswan" / "00000.png")
    assert np.array_equal(video_io.read_mask(masks[0]), truth)  # written as given


def test_given_masks_are_written_as_given_and_the_rest_as_segmented_alone(tmp_path):
    """At a smaller internal size (--size), a dataset run merges each given mask at the
    frames' size as a single run does: every annotated frame is written exactly as given (the
    first; with --masks all also a later one bringing a new object), and every frame equals
    the sequence segmented alone with `stm segment`."""
    root = tmp_path / "root"
    for index, name in enumerate(("delta", "echo")):
        images, labels = synthetic_video(5, size=(48, 80), seed=40 + index, objects=2)
        if name == "echo":  # object 2 enters on frame 2, the frame annotated after the first
            labels = labels.copy()
            labels[:2][labels[:2] == 2] = 0
        write_davis_folder(root, images, labels, name=name)
    for t in (1, 3, 4):
        (root / "Annotations" / "480p" / "echo" / f"{t:05d}.png").unlink()
    first, every = tmp_path / "first", tmp_path / "every"
    assert main(["segment", str(root), "--output", str(first), "--size", "24", *OPTIONS]) == 0
    assert main(["segment-dataset", str(root), "--output", str(every), "--masks", "all",
                 "--size", "24", *OPTIONS]) == 0
    for name in ("delta", "echo"):
        annotations = root / "Annotations" / "480p" / name
        for output, given in ((first, ["--mask", str(annotations / "00000.png")]),
                              (every, ["--masks", str(annotations)])):
            alone = tmp_path / f"alone-{output.name}-{name}"
            assert main(["segment", str(root / "JPEGImages" / "480p" / name), *given,
                         "--output", str(alone), "--overlay", "none", "--size", "24",
                         *OPTIONS]) == 0
            for t in range(5):
                ours = video_io.read_mask(output / name / f"{t:05d}.png")
                annotation = annotations / f"{t:05d}.png"
                if t == 0 or (output == every and annotation.exists()):
                    assert np.array_equal(ours, video_io.read_mask(annotation)), (name, t)
                single = video_io.read_mask(alone / "masks" / f"{t:05d}.png")
                assert (ours != single).mean() < 1e-3, (output.name, name, t)
