"""tools.interactive_ceiling on a small synthetic DAVIS folder: its figures are in range and
its per-sequence line is printed."""
import numpy as np
from PIL import Image

from stm_model import io as video_io
from stm_model.training.datasets import HELD_OUT_SEEDS
from stm_model.training.synthetic import SyntheticVideo
from tools import interactive_ceiling


def test_ceiling_figures_on_a_synthetic_sequence(tmp_path, capsys):
    video = SyntheticVideo(HELD_OUT_SEEDS + 2, 64, 96, num_objects=2)
    images, labels = zip(*video.frames(8), strict=True)
    for t, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / "davis" / "JPEGImages" / "480p" / "synth"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"{t:05d}.png")
        video_io.write_mask(tmp_path / "davis" / "Annotations" / "480p" / "synth" /
                            f"{t:05d}.png", label.astype(np.uint8))
    model_frames, model_labels = interactive_ceiling._sequence(tmp_path / "davis", "synth")
    assert model_frames.shape == (8, 3, 64, 96) and (model_labels == np.stack(labels)).all()
    from stm_model.network.checkpoint import load_checkpoint
    result = interactive_ceiling.measure(load_checkpoint("small-interactive"), model_frames,
                                         model_labels)
    assert 0 <= result["corrected_frame"] < 8 and 0 <= result["first_frame"] < 8
    assert 0 < result["mass_on_corrected"] < 1
    for key in ("j_frame", "j_neighbours", "j_all"):
        assert all(0 <= value <= 1 for value in result[key])
    assert 0 <= result["j_from_own_truth"] <= 1
    assert interactive_ceiling.main(["--root", str(tmp_path / "davis"), "--sequences", "synth",
                                     "--checkpoint", "small-interactive"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("synth at 96x64: first round on frame") and np.isfinite(
        result["j_all"][1])
