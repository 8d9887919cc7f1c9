"""Evaluation of interactive segmentation with a robot user, as the DAVIS interactive track.

    result = evaluate_interactive(model, frames, gt_labels, rounds=8)
    result["rounds"]   # per round: annotated frame, J&F, J, F, seconds, cumulative seconds
    result["auc"], result["jf_at_60s"]

The loop: round 1 scribbles the frame where the objects cover the most pixels (the DAVIS
annotators chose a "representative" frame; a given first-round scribble file replaces this),
every later round the frame with the worst mean J of the current masks. On that frame the robot
draws, for every id k (0 = the background) whose error region (ground truth k, prediction not k)
has a large enough component, one stroke along the skeleton of the largest component (the
benchmark's robot follows the same idea). The session then re-segments the video; J&F is
measured on every frame (the interactive protocol scores all frames) after each round.

Time-based scores (our implementation of the track's two numbers): the time axis is the
method's own compute time per round, accumulated and divided by the number of objects (the
track's budgets are per object); J&F(t) is the J&F of the last round finished by t (0 before
the first). AUC is the mean of J&F(t) over [0, max_time] (default 8 rounds x 30 s per object);
J&F@60s is J&F(60 s). Both depend on the device the rounds ran on.
"""
import json
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from stm_model import metrics
from stm_model import io as video_io
from stm_model.interactive import scribbles as scribble_format
from stm_model.interactive.session import InteractiveSession


class RobotUser:
    """Simulated user: from ground truth and the current prediction, the next round's scribbles
    in the DAVIS format (see the module docstring)."""

    def __init__(self, min_pixels=None):
        self.min_pixels = min_pixels

    def first_frame(self, gt_labels):
        """The frame where the objects cover the most pixels."""
        return int(np.argmax((np.asarray(gt_labels) > 0).reshape(len(gt_labels), -1).sum(1)))

    def worst_frame(self, gt_labels, pred_labels, num_objects):
        """The frame with the lowest mean J over the objects."""
        per_frame = [np.mean([metrics.region_similarity(gt == k, pred == k)
                              for k in range(1, num_objects + 1)])
                     for gt, pred in zip(gt_labels, pred_labels, strict=True)]
        return int(np.argmin(per_frame))

    def interact(self, gt_labels, pred_labels, num_objects, frame=None, sequence=None):
        """(scribbles, frame): strokes on `frame` (default: the worst frame) that correct the
        prediction there; scribbles is None when no error region is large enough."""
        gt_labels, pred_labels = np.asarray(gt_labels), np.asarray(pred_labels)
        if gt_labels.shape != pred_labels.shape:
            raise ValueError(f"gt_labels {gt_labels.shape} and pred_labels {pred_labels.shape} "
                             "must have the same (T, H, W) shape")
        if frame is None:
            frame = self.worst_frame(gt_labels, pred_labels, num_objects)
        strokes = scribble_format.synthesize_strokes(gt_labels[frame], pred_labels[frame],
                                                     num_objects, min_pixels=self.min_pixels)
        if not strokes:
            return None, frame
        scribbles = scribble_format.empty_scribbles(len(gt_labels), sequence)
        scribbles["scribbles"][frame] = strokes
        return scribbles, frame


def jf_scores(gt_labels, pred_labels, num_objects):
    """(J&F, J, F): means over objects 1..n and all frames."""
    scored = metrics.evaluate_sequence(gt_labels, pred_labels,
                                       object_ids=range(1, num_objects + 1))
    j, f = float(np.mean(scored["J"])), float(np.mean(scored["F"]))
    return (j + f) / 2, j, f


def time_scores(cumulative_seconds, jf_values, num_objects, max_time=240.0, at_time=60.0):
    """(AUC, J&F at `at_time`) of the J&F-against-time step curve (see the module docstring);
    times are per object."""
    times = np.asarray(cumulative_seconds, dtype=np.float64) / num_objects
    values = np.asarray(jf_values, dtype=np.float64)

    def jf_at(t):
        done = np.flatnonzero(times <= t)
        return float(values[done[-1]]) if len(done) else 0.0

    edges = np.concatenate([[0.0], np.minimum(times, max_time), [max_time]])
    levels = [0.0] + list(values)
    area = sum(level * (edges[i + 1] - edges[i]) for i, level in enumerate(levels))
    return float(area / max_time), jf_at(at_time)


def evaluate_interactive(model, frames, gt_labels, *, num_objects=None, rounds=8,
                         first_scribbles=None, robot=None, max_time=240.0, at_time=60.0,
                         sequence=None, on_round=None, **session_options):
    """Up to `rounds` robot interactions on one video (see the module docstring).

    frames (T, 3, h, w) float in [0, 1]; gt_labels (T, H, W) integer ids (0 = background); when
    (h, w) differs from (H, W) the session runs at (h, w) and the robot and the scores see its
    masks upsampled (nearest) to (H, W). num_objects defaults to gt_labels.max(); robot to a
    RobotUser(); first_scribbles replaces the robot's first round; max_time and at_time are
    time_scores'; sequence names the video; session_options go to InteractiveSession.
    on_round(round_record) is called after every round. Returns a dict with "rounds" (list of
    dicts), "auc", "jf_at_60s" (at at_time), "num_objects", "max_time", "at_time" and
    "final_labels" ((T, H, W) numpy).
    """
    gt_labels = np.asarray(gt_labels)
    num_objects = int(num_objects or gt_labels.max())
    robot = robot or RobotUser()
    session = InteractiveSession(model, frames, num_objects, sequence=sequence,
                                 **session_options)
    predicted = np.zeros_like(gt_labels)
    records, cumulative = [], 0.0
    for index in range(rounds):
        if index == 0 and first_scribbles is not None:
            scribbles = first_scribbles
            frame = scribble_format.annotated_frames(scribbles)[0]
        else:
            frame = robot.first_frame(gt_labels) if index == 0 else None
            scribbles, frame = robot.interact(gt_labels, predicted, num_objects, frame=frame,
                                              sequence=sequence)
            if scribbles is None:
                break  # nothing left to correct
        predicted = resize_labels(session.interact(scribbles).numpy(), gt_labels.shape[-2:])
        seconds = session.rounds[-1].seconds
        cumulative += seconds
        jf, j, f = jf_scores(gt_labels, predicted, num_objects)
        record = {"round": index + 1, "frame": int(frame), "J&F": jf, "J": j, "F": f,
                  "seconds": seconds, "cumulative_seconds": cumulative,
                  "strokes": len(scribbles["scribbles"][frame]),
                  "memory_frames": session.memory_frames}
        records.append(record)
        if on_round is not None:
            on_round(record)
    auc, at = time_scores([r["cumulative_seconds"] for r in records],
                          [r["J&F"] for r in records], num_objects, max_time, at_time)
    return {"rounds": records, "auc": auc, "jf_at_60s": at, "num_objects": num_objects,
            "max_time": max_time, "at_time": at_time, "final_labels": predicted}


# ------------------------------------------------------------------------------- DAVIS folders


def load_davis_sequence(root, name, resolution="480p", size=None):
    """(frames (T, 3, h, w) float in [0, 1], gt_labels (T, H, W) int64 at full resolution,
    first-round scribbles or None) of one DAVIS-format sequence; size=(h, w) resizes the frames
    (the masks stay at full resolution for scoring). Scribbles come from
    <root>/Scribbles/<name>/001.json when present (the DAVIS interactive layout)."""
    root = pathlib.Path(root)
    paths = video_io.list_frames(root / "JPEGImages" / resolution / name)
    annotations = root / "Annotations" / resolution / name
    gt = []
    for path in paths:
        mask_path = annotations / f"{path.stem}.png"
        if not mask_path.exists():
            raise FileNotFoundError(f"{name}: frame {path.name} has no annotation {mask_path} "
                                    "(interactive evaluation scores every frame)")
        gt.append(video_io.read_mask(mask_path).astype(np.int64))
    frames = torch.stack([torch.from_numpy(np.array(video_io.load_image(p))).permute(2, 0, 1)
                          for p in paths]).float() / 255
    if size is not None and tuple(size) != tuple(frames.shape[-2:]):
        frames = F.interpolate(frames, size=tuple(size), mode="bilinear", antialias=True,
                               align_corners=False).clamp(0, 1)
    scribble_path = root / "Scribbles" / name / "001.json"
    first = json.loads(scribble_path.read_text()) if scribble_path.exists() else None
    return frames, np.stack(gt), first


def resize_labels(labels, size):
    """Nearest-neighbour resize of (T, h, w) integer labels (numpy) to size (H, W)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    resized = F.interpolate(torch.from_numpy(labels)[:, None].float(), size=tuple(size),
                            mode="nearest")
    return resized[:, 0].long().numpy()


def evaluate_davis(model, root, sequences=None, *, resolution="480p", size=None, rounds=8,
                   max_time=240.0, at_time=60.0, show_progress=True, **session_options):
    """evaluate_interactive on DAVIS-format sequences; returns {name: result} (labels dropped).
    With size=(h, w) the session runs at that size and the robot and the scores see its
    masks upsampled to the annotations' resolution."""
    root = pathlib.Path(root)
    names = sequences or sorted(p.name for p in (root / "Annotations" / resolution).iterdir()
                                if p.is_dir())
    if not names:
        raise FileNotFoundError(f"no sequences in {root / 'Annotations' / resolution}")
    results = {}
    progress = tqdm(total=len(names) * rounds, unit="round", disable=not show_progress)
    for name in names:
        frames, gt, first = load_davis_sequence(root, name, resolution, size)
        progress.set_description(name)
        result = evaluate_interactive(model, frames, gt, rounds=rounds, first_scribbles=first,
                                      max_time=max_time, at_time=at_time, sequence=name,
                                      on_round=lambda record: progress.update(1),
                                      **session_options)
        result.pop("final_labels")
        results[name] = dict(result, num_frames=len(gt))
        progress.update(rounds - len(results[name]["rounds"]))
    progress.close()
    return results


def format_report(results):
    """A markdown table: per sequence J&F after each round, AUC, J&F@60s, seconds per round;
    and the mean row."""
    rounds = max(len(r["rounds"]) for r in results.values())
    header = ("| sequence | objects | frames | "
              + " | ".join(f"J&F r{i + 1}" for i in range(rounds))
              + " | AUC | J&F@60s | s/round |")
    lines = [header, "|" + "---|" * (rounds + 6)]
    for name, result in results.items():
        jf = [f"{r['J&F']:.3f}" for r in result["rounds"]]
        jf += ["-"] * (rounds - len(result["rounds"]))
        per_round = np.mean([r["seconds"] for r in result["rounds"]])
        lines.append(f"| {name} | {result['num_objects']} | {result.get('num_frames', '')} | "
                     + " | ".join(jf) + f" | {result['auc']:.3f} | {result['jf_at_60s']:.3f} | "
                     f"{per_round:.2f} |")
    auc = np.mean([r["auc"] for r in results.values()])
    at = np.mean([r["jf_at_60s"] for r in results.values()])
    # a sequence that stopped early (nothing left to correct) keeps its last masks
    means = [np.mean([r["rounds"][min(i, len(r["rounds"]) - 1)]["J&F"]
                      for r in results.values()]) for i in range(rounds)]
    seconds = np.mean([x["seconds"] for r in results.values() for x in r["rounds"]])
    lines.append("| **mean** | | | " + " | ".join(f"{m:.3f}" for m in means)
                 + f" | {auc:.3f} | {at:.3f} | {seconds:.2f} |")
    return "\n".join(lines)


def plot_curves(results, path):
    """J&F against time per object (step curves, one per sequence) and against the round."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (by_time, by_round) = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in results.items():
        times = [0.0] + [r["cumulative_seconds"] / result["num_objects"] for r in result["rounds"]]
        values = [0.0] + [r["J&F"] for r in result["rounds"]]
        by_time.step(times + [result["max_time"]], values + values[-1:], where="post", label=name)
        by_round.plot(range(1, len(values)), values[1:], marker="o", label=name)
    at_time = next(iter(results.values()))["at_time"]
    by_time.axvline(at_time, color="grey", linestyle=":", label=f"{at_time:g} s")
    by_time.set(xlabel="method time per object (s)", ylabel="J&F", ylim=(0, 1),
                title="J&F against time (AUC = mean height)")
    by_round.set(xlabel="round", ylabel="J&F", ylim=(0, 1), title="J&F after each round")
    by_round.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_results(results, path, **metadata):
    """The results (and metadata such as device and settings) as JSON."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metadata, sequences=results), indent=1))
    return path
