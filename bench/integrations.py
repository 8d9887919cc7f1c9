"""Cutie and STCN on a long video with every memory frame kept: their own read against the
fused one (stm_kernels.integrations), fps and peak memory against video length.

    python -m bench integrations                               # both models, 1,000 and 3,000
    python -m bench integrations --models cutie --lengths 200 --size 240 432

A DAVIS-2016 sequence (../shared/data, --sequence) is played forwards and backwards
(ping-pong) up to the longest of --lengths; its first annotation starts the video. The memory
caps are raised so that every memory frame (one in --mem-every) stays: Cutie without its
long-term memory and with max_mem_frames above the video's memory frames, STCN with an
unbounded memory bank. The weights are random and seeded (nothing is downloaded): the read's
cost does not depend on them, and the masks are not scored here (tests/integrations checks
that the fused read gives the packages' own masks). Each model x read runs in a fresh process
(bench.common.run_isolated), so that its peak resident set is its own; on a CPU twice, the
speed with glibc's allocator as it is and the peak memory with freed blocks unmapped (which
costs time: _measured). A run stops at --time-limit seconds or when it runs out of memory,
and that is recorded.
"""
import contextlib
import pathlib
import sys
import tempfile
import time
import types

import numpy as np
import torch

from bench import common
from bench.long_video import SHARED_DAVIS, load_video, peak_bytes, ping_pong

MODELS = ("cutie", "stcn")
READS = ("original", "fused")
DEFAULTS = dict(lengths=[1000, 3000], size=[240, 432], sequence="blackswan", mem_every=5,
                time_limit=1200.0)


def build_cutie(device, work_dir, top_k=30, mem_every=5):
    """(step(frame, labels or None) -> probabilities, the object to patch, its name): Cutie-small
    with seeded random weights, long-term memory off and no cap on the working memory."""
    from cutie.inference.inference_core import InferenceCore
    from cutie.model.cutie import CUTIE
    from cutie.model.utils import resnet
    torch.manual_seed(0)
    # Cutie's constructor loads ImageNet weights by file name from this folder
    torch.save(resnet.resnet18(pretrained=False).state_dict(),
               pathlib.Path(work_dir) / "resnet18-5c106cde.pth")
    cfg = cutie_config(work_dir, {"use_long_term": False, "max_mem_frames": 10**9,
                                  "top_k": top_k, "mem_every": mem_every})
    network = CUTIE(cfg).to(device).eval()
    processor = InferenceCore(network, cfg)

    def step(frame, labels, is_memory_frame):  # Cutie picks the same memory frames itself
        if labels is not None:
            return processor.step(frame, labels, [1])
        return processor.step(frame)
    return step, processor, "Cutie-small (rf-cutie, random weights)"


def cutie_config(resnet_dir, *settings):
    """Cutie's eval config with the small model, composed from the packaged yaml files (what
    hydra would compose; hydra is not needed), its ResNet weights read from resnet_dir, then
    each of `settings` (dicts) merged in."""
    import importlib.resources
    from omegaconf import OmegaConf
    root = importlib.resources.files("cutie") / "config"
    cfg = OmegaConf.load(root / "eval_config.yaml")
    for key in ("defaults", "hydra", "datasets"):
        cfg.pop(key)
    small = OmegaConf.load(root / "model" / "small.yaml")
    small.pop("defaults")
    cfg.model = OmegaConf.merge(OmegaConf.load(root / "model" / "base.yaml"), small)
    cfg.model.resnet_model_path = str(resnet_dir)
    for setting in settings:
        cfg.merge_with(setting)
    return cfg


def random_stcn():
    """stcnbuf's STCN network (ResNet-50 keys, ResNet-18 values) in eval mode on the CPU with
    seeded random weights: its ImageNet downloads replaced by untrained torchvision networks."""
    import torchvision
    from stcnbuf.model import eval_network, mod_resnet, modules
    resnet18 = mod_resnet.resnet18
    with contextlib.ExitStack() as stack:
        stack.callback(setattr, modules, "models", modules.models)
        stack.callback(setattr, modules, "mod_resnet", modules.mod_resnet)
        modules.models = types.SimpleNamespace(
            resnet50=lambda weights: torchvision.models.resnet50(weights=None))
        modules.mod_resnet = types.SimpleNamespace(
            resnet18=lambda pretrained, extra_chan: resnet18(False, extra_chan))
        torch.manual_seed(0)
        return eval_network.STCN().eval()


def build_stcn(device, top_k=20):
    """The same for stcnbuf's STCN (random_stcn), unbounded memory."""
    import torchvision
    from stcnbuf.model import eval_network
    network = random_stcn().to(device)
    processor = eval_network.STCNInference(network, np.inf, 1, top_k, None)
    normalise = torchvision.transforms.Normalize(mean=[0.485, 0.456, 0.406],
                                                 std=[0.229, 0.224, 0.225])

    def step(frame, labels, is_memory_frame):
        if labels is not None:
            image = (frame.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            masks = (labels == 1).float()[None].to(device)
            with _cuda_as_identity(device):  # initialize sends its frame to CUDA
                processor.initialize(image, masks)
            return None
        return processor.predict_batch(normalise(frame)[None],
                                       add_last_to_memory=is_memory_frame)
    return step, processor, "STCN (stcnbuf, random weights)"


@contextlib.contextmanager
def _cuda_as_identity(device):
    """Tensor.cuda() as a no-op while STCNInference.initialize runs on a CPU."""
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def run_one(spec):
    """Segment the long video with one model and read; returns its record (fresh process)."""
    device = torch.device(spec["device"])
    frames, labels, video_name = load_video(spec["source"], max(spec["lengths"]),
                                            tuple(spec["size"]), spec["sequence"])
    frames = frames.to(device)
    with tempfile.TemporaryDirectory() as work_dir:
        if spec["model"] == "cutie":
            step, target, model_name = build_cutie(device, work_dir, spec["top_k"],
                                                   spec["mem_every"])
        else:
            step, target, model_name = build_stcn(device, spec["top_k"])
    if spec["read"] == "fused":
        from stm_kernels.integrations import cutie, stcn
        (cutie if spec["model"] == "cutie" else stcn).use_fused_read(target)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        common.reset_peak_rss()
    baseline = (common.status_bytes("VmRSS") if device.type == "cpu"
                else torch.cuda.memory_allocated(device))
    frame_ms, checkpoints, status = [], [], "ok"
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for t in range(max(spec["lengths"])):
                if t and time.perf_counter() - start > spec["time_limit"]:
                    status = f"time limit ({spec['time_limit']:g} s) at frame {t}"
                    break
                frame = frames[ping_pong(t, len(frames))]
                tick = time.perf_counter()
                step(frame, labels.to(device) if t == 0 else None,
                     t % spec["mem_every"] == 0)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                frame_ms.append((time.perf_counter() - tick) * 1e3)
                if t + 1 in spec["lengths"]:
                    checkpoints.append(_checkpoint(t + 1, frame_ms, device, baseline,
                                                   spec["mem_every"]))
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as error:
        if not isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) and \
                "out of memory" not in str(error).lower():
            raise
        status = f"out of memory at frame {len(frame_ms)}"
    except KeyboardInterrupt:  # the frames so far are the run's result (run_isolated)
        status = f"interrupted at frame {len(frame_ms)}"
    last = _checkpoint(len(frame_ms), frame_ms, device, baseline, spec["mem_every"]) \
        if frame_ms else None
    return dict(model=spec["model"], read=spec["read"], top_k=spec["top_k"],
                model_name=model_name,
                video=video_name, status=status, checkpoints=checkpoints, last=last,
                frame_ms=frame_ms[::max(1, len(frame_ms) // 1000)])


def _checkpoint(length, frame_ms, device, baseline, mem_every):
    peak = peak_bytes(device)
    return dict(length=length, memory_frames=(length - 1) // mem_every + 1,
                fps=length / (sum(frame_ms) / 1e3),
                fps_last_100=min(100, length) / (sum(frame_ms[-100:]) / 1e3),
                peak_mem_bytes=peak - baseline)


def _measured(spec, device, timeout):
    """One model x read's record: its speed and, on a CPU, its peaks from a second run over
    the frames the first reached, whatever the clock says this time (common.speed_then_peak);
    each row's peak_mem_bytes is the second run's at its length."""
    return common.speed_then_peak_over_lengths("bench.integrations", spec, device, _rows,
                                               timeout)


def _rows(record):
    """A record's checkpoints and its last frame's row (which may repeat the last checkpoint)."""
    return record["checkpoints"] + ([record["last"]] if record["last"] else [])


def summary(payload):
    """One row per model, read and length reached: fps, peak memory, and how the run ended."""
    height, width = payload["size"]
    lines = [f"{payload['video']}, {width}x{height}, a memory frame every "
             f"{payload['mem_every']} frames, all kept (top-k: Cutie 30, STCN 20 unless "
             f"--top-k); time limit {payload['time_limit']:g} s per run; "
             f"{payload['peak_mem_note']}.",
             "", "| model | read | frames | memory frames | fps | fps (last 100) | peak MiB | "
             "run |", "|---|---|---|---|---|---|---|---|"]
    for record in payload["records"]:
        rows = list(record["checkpoints"])
        if record["last"] and (not rows or rows[-1]["length"] != record["last"]["length"]):
            rows.append(record["last"])
        for row in rows:
            lines.append(f"| {record['model']} | {record['read']} | {row['length']} | "
                         f"{row['memory_frames']} | {row['fps']:.2f} | "
                         f"{row['fps_last_100']:.2f} | {common.mib(row['peak_mem_bytes'])} | "
                         f"{record['status']} |")
    return "\n".join(lines)


def plot(payload, path):
    """Frame time and peak memory against the frame, per model and read; returns [path]."""
    figure, (time_axis, memory_axis) = common.subplots(1, 2, figsize=(11, 3.8))
    for record in payload["records"]:
        label = f"{record['model']} {record['read']}"
        step = max(1, (record["last"] or {}).get("length", 1) // max(1, len(record["frame_ms"])))
        time_axis.plot(np.arange(len(record["frame_ms"])) * step, record["frame_ms"],
                       label=label, linewidth=0.8)
        rows = [row for row in _rows(record) if row["peak_mem_bytes"] is not None]
        memory_axis.plot([row["length"] for row in rows],
                         [row["peak_mem_bytes"] / 2**20 for row in rows], "o-", label=label)
    time_axis.set(xlabel="frame", ylabel="ms per frame", yscale="log")
    memory_axis.set(xlabel="frames segmented", ylabel="peak memory (MiB)")
    for axis in (time_axis, memory_axis):
        axis.legend(fontsize=7)
    figure.suptitle(f"Cutie and STCN with every memory frame kept, their read vs the fused one "
                    f"({payload['device']}, torch {payload['torch']}, {payload['date'][:10]})",
                    fontsize=9)
    return common.save_figure(figure, path, dpi=100)


def main(argv=None):
    """`python -m bench integrations`; returns the exit code."""
    parser = common.benchmark_parser(__doc__, "python -m bench integrations")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--reads", nargs="+", choices=READS, default=list(READS))
    parser.add_argument("--lengths", nargs="+", type=int, default=DEFAULTS["lengths"])
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        default=DEFAULTS["size"])
    parser.add_argument("--source", help="a DAVIS-format root (default: ../shared/data/"
                                         "davis2016-val), or 'synthetic'")
    parser.add_argument("--sequence", default=DEFAULTS["sequence"])
    parser.add_argument("--mem-every", type=int, default=DEFAULTS["mem_every"])
    parser.add_argument("--top-k", type=int, default=None,
                        help="default: each model's own (Cutie 30, STCN 20)")
    parser.add_argument("--time-limit", type=float, default=DEFAULTS["time_limit"],
                        help="seconds per model and read before the run stops")
    args = common.parse_args_or_run_child(parser, argv, run_one)
    if args is None:
        return 0
    device = common.pick_device(args.device)
    source = args.source or (str(SHARED_DAVIS) if SHARED_DAVIS.exists() else "synthetic")
    spec = dict(device=str(device), lengths=sorted(args.lengths), size=list(args.size),
                source=source, sequence=args.sequence if source != "synthetic" else None,
                mem_every=args.mem_every, time_limit=args.time_limit)
    payload = common.environment(device)
    payload.update(benchmark="integrations", **{k: v for k, v in spec.items() if k != "device"},
                   peak_mem_note=("peak: resident-set high-water mark above the resident set "
                                  "before the first frame, from a second run with freed blocks "
                                  "unmapped (fps: a run with the allocator as it is)"
                                  if device.type == "cpu" else
                                  "peak: CUDA allocator peak above the memory allocated before "
                                  "the first frame"),
                   records=[])
    for model in args.models:
        for read in args.reads:
            top_k = args.top_k or {"cutie": 30, "stcn": 20}[model]
            try:
                record = _measured(dict(spec, model=model, read=read, top_k=top_k), device,
                                   timeout=args.time_limit + 1800)
            except common.Interrupted as stop:
                common.keep_interrupted("integrations", payload, stop)
                raise
            payload["records"].append(record)
            payload.setdefault("video", record["video"])
            last = record["last"]
            print(f"{model:6} {read:9} {record['status']:30} "
                  + (f"{last['length']} frames {last['fps']:.2f} fps "
                     f"{common.mib(last['peak_mem_bytes'])} MiB" if last else ""), flush=True)
            common.save_progress("integrations", payload)
    common.finish_run("integrations", payload, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
