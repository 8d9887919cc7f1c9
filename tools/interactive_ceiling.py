"""What an interactive correction can do for a model, measured on DAVIS-format sequences: why
the robot's corrections move the masks so little (docs/interactive.md).

    python -m tools.interactive_ceiling --root ../shared/data/davis2016-val --sequences soapbox

Per sequence: the robot's first round (stm_model.interactive.robot), then the frame its second
round would correct (the worst J). With that frame memorised beside the first round's with its
ground-truth mask, it reports the share of the read's softmax mass on the corrected frame, and J
(on the frame, its ten neighbours, all frames) before and after every frame is segmented again:
a perfect correction's effect through the memory. Then the corrected frame alone in the memory
with its ground truth, and the same frame segmented from it: whether the model can segment that
frame at all. At the model's internal size, or --size.
"""
import argparse
import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F

from stm_model import io as video_io
from stm_model import metrics
from stm_model.interactive import scribbles as scribble_format
from stm_model.interactive.robot import RobotUser, resize_labels
from stm_model.interactive.session import InteractiveSession
from stm_model.network.checkpoint import load_checkpoint, resolve_checkpoint


def _sequence(root, name):
    """(frames (T, 3, H, W) float, labels (T, H, W) int64 ids) of a DAVIS-format sequence."""
    paths = video_io.list_frames(root / "JPEGImages" / "480p" / name)
    frames = torch.stack([video_io.to_tensor(video_io.load_image(path)) for path in paths])
    labels = np.stack([video_io.read_mask(root / "Annotations" / "480p" / name /
                                          f"{path.stem}.png") for path in paths])
    return frames, labels


def _memorise_truth(session, t, truth):
    """Memorise frame t of the session with the one-hot `truth` (T, h, w) as its mask."""
    ids = torch.arange(1, session.num_objects + 1).view(-1, 1, 1)
    session.probs[t] = (torch.from_numpy(truth[t])[None] == ids).to(session.probs.dtype)
    session.scribble_maps.setdefault(t, np.full(session.size, scribble_format.NO_SCRIBBLE,
                                                np.int16))
    session._memorise(t)


def _j(truth, session, frames):
    """Mean J over the objects of each frame in `frames`, at the session's size."""
    return np.array([np.mean([metrics.region_similarity(truth[t] == k,
                                                        session._labels_inside(t).numpy() == k)
                              for k in range(1, session.num_objects + 1)]) for t in frames])


@torch.no_grad()
def measure(model, frames, labels, max_internal_size=None):
    """The figures of the module docstring for one sequence, as a dict."""
    num_objects = int(labels.max())
    options = dict(max_internal_size=max_internal_size)
    session = InteractiveSession(model, frames, num_objects, **options)
    truth = F.interpolate(torch.from_numpy(labels[:, None]).float(), size=session.size,
                          mode="nearest")[:, 0].long().numpy()
    robot = RobotUser()
    first = robot.first_frame(labels)
    scribbles, _ = robot.interact(labels, np.zeros_like(labels), num_objects, frame=first)
    predicted = resize_labels(session.interact(scribbles).numpy(), labels.shape[-2:])
    worst = robot.worst_frame(labels, predicted, num_objects)
    everything = range(len(labels))
    near = range(max(0, worst - 5), min(len(labels), worst + 6))
    before = _j(truth, session, everything)
    _memorise_truth(session, worst, truth)
    query = session.queries.batch([worst], dtype=session.bank.dtype, device=session.device).key
    keys, _ = session.bank.memory_views()
    slot = session.memory_frame_indices.index(worst)
    count = keys.shape[-1] // session.memory_frames
    affinity = torch.einsum("ck,cq->kq", keys[0].float(), query.flatten(2)[0].float())
    mass = affinity.div(keys.shape[1] ** 0.5).softmax(0)[slot * count:(slot + 1) * count]
    session._segment(list(everything))
    after = _j(truth, session, everything)
    alone = InteractiveSession(model, frames, num_objects, **options)
    alone.scribble_maps[worst] = np.full(alone.size, scribble_format.NO_SCRIBBLE, np.int16)
    alone._without_undrawn_objects = lambda probs: probs  # no strokes: every object is given
    _memorise_truth(alone, worst, truth)
    alone._segment([worst])
    return dict(first_frame=first, corrected_frame=worst, mass_on_corrected=float(
        mass.sum(0).mean()), j_frame=(before[worst], after[worst]),
        j_neighbours=(before[list(near)].mean(), after[list(near)].mean()),
        j_all=(before.mean(), after.mean()), j_from_own_truth=float(
            _j(truth, alone, [worst])[0]), size=session.size)


def main(argv=None):
    """`python -m tools.interactive_ceiling`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m tools.interactive_ceiling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="a DAVIS-format root")
    parser.add_argument("--sequences", nargs="+", required=True)
    parser.add_argument("--checkpoint", default="small-real-interactive")
    parser.add_argument("--size", type=int, help="internal size (default: the model's own)")
    args = parser.parse_args(argv)
    model = load_checkpoint(resolve_checkpoint(args.checkpoint))
    for name in args.sequences:
        frames, labels = _sequence(pathlib.Path(args.root), name)
        r = measure(model, frames, labels, args.size)
        print(f"{name} at {r['size'][1]}x{r['size'][0]}: first round on frame "
              f"{r['first_frame']}, corrected frame {r['corrected_frame']} "
              f"(softmax mass on it {r['mass_on_corrected']:.2f}); J with its ground truth "
              f"memorised: frame {r['j_frame'][0]:.3f} -> {r['j_frame'][1]:.3f}, neighbours "
              f"{r['j_neighbours'][0]:.3f} -> {r['j_neighbours'][1]:.3f}, all "
              f"{r['j_all'][0]:.3f} -> {r['j_all'][1]:.3f}; the frame from its own ground "
              f"truth alone: {r['j_from_own_truth']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
