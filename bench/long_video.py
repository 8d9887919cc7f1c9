"""Long-video inference end to end: fps and peak memory against video length, and the time of
the memory read (and of everything else) per frame against memory size, for the fused and the
naive read, with and without fp16 memory storage and memory offload.

    python -m bench long-video                          # defaults for the device present
    python -m bench long-video --lengths 100 1000 --variants fused naive
    python -m bench long-video --lengths 30 --input-resolutions 480p 1080p 4k  # internal 480
    python -m bench long-video --lengths 30 100 --variants fused fused-compile
    python -m bench long-video --variants fused fused-graphs --warmup 5   # GPU: CUDA graphs
    python -m bench long-video --command 240p 480p --lengths 2000   # `stm segment`: RSS, bank
    python -m bench long-video --size 480 854 --variants fused --memory-dtype bf16 int8 \
        --max-memory-bytes 12582912 --lengths 100 200 300   # one bank budget, two dtypes

The video: a real DAVIS-2016 sequence from ../shared/data ping-ponged (forwards, backwards,
forwards ...) to the longest length when that folder is present, a synthetic video otherwise;
frames are decoded and resized once, before timing. Each variant runs in a fresh process that
segments the video with VideoSegmenter (mem_every=5: 2,000 memory frames at 10,000 frames)
and records at each length of --lengths the fps so far and the peak memory so far; per frame,
the wall time of the step and of its memory reads. On a CPU each variant runs twice: timed
with glibc's allocator as it is, then again over the lengths reached for the peaks, with freed
blocks unmapped (bench.common.speed_then_peak; that allocator slows a run by tens of
percent). A variant that runs out of memory stops
there (recorded). GPU: the official-size STM (ResNet-50, random weights: timing does not
depend on them) at 480p under bf16 autocast; CPU: the small trained model at a smaller size.
Writes bench/results/long_video_<device>_<date>.json and a PNG beside it.

High-resolution input (--input-resolutions 480p 1080p 4k, with --max-internal-size N): each
variant runs once per input resolution; frames are upscaled from the --size cycle to that
resolution outside the timed step and segmented with VideoSegmenter(max_internal_size=N).
Each checkpoint records the memory per memory frame (bank storage) and the fps.

--time-limit S stops each variant after S seconds of segmenting (a lent GPU's call is 10
minutes): its record then ends with a checkpoint at the frame reached and the status "time
limit (S s) at frame T". The results file is saved after each variant.

The command (--command 240p 480p): `stm segment` itself, with its defaults and --overlay none,
on a synthetic H.264 video of moving shapes written at each size (two objects, the first
frame's mask), in a fresh process with glibc's allocator as it is: after every frame the
process's resident set (VmRSS) and the memory bank's bytes, those of the frames it holds and
the capacity set aside, are recorded, with the frame's time. The plot draws the resident set
and the bank against frames, and each one's growth from frame 100 (the command's first frames
load libraries and fill oneDNN's caches). --compare-with DIR alternates every run with the
same run on another source tree (DIR holding its stm_model and stm_kernels, e.g. `git archive
OLD_COMMIT stm_model stm_kernels | tar -x -C DIR`), --repeats times: speed figures of two
commits in one interleaved measurement.

--memory-dtype D [D ...]: each variant runs once per memory dtype (VideoSegmenter's
memory_dtype: fp32, bf16, int8, ...; not with a variant that sets its own). --max-memory-bytes
B: a fixed budget for the memory bank. Each run keeps as many memory frames as fit in it
(VideoSegmenter(max_memory_frames=B // the bytes one memory frame takes in its dtype, scales
included), evicting the oldest past that), so the table below the main one compares the frames
each dtype keeps within the same bytes, and the peak beyond the bank against one read chunk's
dequantised copy: what an 8-bit memory's read adds (the torch backend widens one chunk of
CPU_CHUNK positions at a time).

Variant fused-compile: VideoSegmenter(compile=True). Its compilation runs in a warm-up of a
few frames on a separate segmenter before timing (recorded as warmup_s; --warmup N gives
every variant such a warm-up); per-read times are not available inside the compiled graph
(read_timed false). Variant fused-graphs: VideoSegmenter(compile={"mode": "reduce-overhead"}):
the per-frame step replayed as CUDA graphs (on a GPU; a CPU runs it compiled), the read
included, over each memory bank's whole capacity with its lengths on the device (one
recording per capacity); its reads are not timed one by one (read_timed false).
Variant fused-channels-last: the model's weights laid out channels-last before the segmenter
takes it, which a GPU's session otherwise leaves as they are (on a CPU every session does it:
there the variant is "fused").
"""
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench import common
from stm_model.inference.options import MEMORY_DTYPES

SHARED_DAVIS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016-val"
VARIANTS = {  # name: VideoSegmenter options ("fused" = triton on CUDA, torch on CPU)
    "fused": dict(read="fused"),
    "naive": dict(read="naive"),
    "fused-fp16": dict(read="fused", memory_dtype="fp16"),
    "naive-fp16": dict(read="naive", memory_dtype="fp16"),
    "fused-offload": dict(read="fused", offload=True),
    "fused-fp16-offload": dict(read="fused", memory_dtype="fp16", offload=True),
    "fused-compile": dict(read="fused", compile=True),
    "fused-graphs": dict(read="fused", compile={"mode": "reduce-overhead"}),
    "fused-channels-last": dict(read="fused", channels_last=True),
}
INPUT_RESOLUTIONS = {"480p": (480, 854), "1080p": (1080, 1920), "4k": (2160, 3840)}
COMMAND_SIZES = {"240p": (240, 426), "480p": (480, 854)}  # --command's videos (H, W)
GROWTH_FROM = 100  # --command: growth is counted from this frame on
# the masked frame, then predictions: compiles every function, and with CUDA graphs each is
# called twice before timing (graph trees run a function once, then record it)
COMPILE_WARMUP_FRAMES = 3
DEFAULTS = {
    "cuda": dict(model="official", size=(480, 854), lengths=(100, 300, 1000, 3000, 10000),
                 variants=("fused", "naive", "fused-fp16", "naive-fp16", "fused-offload",
                           "fused-fp16-offload")),
    # offload is a no-op on CPU (the memory is already there); fp16 storage is read in fp16
    "cpu": dict(model="small", size=(128, 224), lengths=(100, 300, 1000),
                variants=("fused", "naive", "fused-fp16")),
}


def load_video(source, length, size, sequence=None):
    """(frames (T, 3, H, W) float in [0, 1] for one cycle, first-frame labels (H, W), name);
    frame t of the long video is cycle[ping_pong(t)]."""
    if source != "synthetic":
        from PIL import Image
        from stm_model import io as video_io
        root = pathlib.Path(source)
        name = sequence or sorted(p.name for p in (root / "JPEGImages" / "480p").iterdir())[0]
        frames = []
        for path in video_io.list_frames(root / "JPEGImages" / "480p" / name):
            image = Image.open(path).convert("RGB").resize(size[::-1], Image.BILINEAR)
            frames.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        mask = video_io.read_mask(root / "Annotations" / "480p" / name / "00000.png")
        labels = F.interpolate(torch.from_numpy((mask > 0).astype(np.float32))[None, None],
                               size=size, mode="nearest")[0, 0].long()
        return torch.stack(frames).float() / 255, labels, \
            f"{root.name}/{name} ({len(frames)} frames, ping-pong)"
    from stm_model.training.datasets import HELD_OUT_SEEDS
    from stm_model.training.synthetic import SyntheticVideo
    video = SyntheticVideo(HELD_OUT_SEEDS, *size, num_objects=1)
    cycle = min(length, 200)
    images, first = [], None
    for t, (image, labels) in enumerate(video.frames(cycle)):
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        first = labels if t == 0 else first
    return torch.stack(images), torch.from_numpy(first).long(), \
        f"synthetic seed {HELD_OUT_SEEDS} ({cycle}-frame ping-pong)"


def ping_pong(t, cycle):
    """Index into a cycle of `cycle` frames of frame t of the video played forwards,
    backwards, forwards, ..."""
    if cycle == 1:
        return 0
    period = 2 * (cycle - 1)
    t %= period
    return t if t < cycle else period - t


class _ReadTimer:
    """Wall time of every MemoryBank.read in a step (CUDA events on GPU, resolved after the
    step's synchronisation)."""

    def __init__(self, device):
        from stm_model.memory import bank as memory_bank
        self.device, self.pending = device, []
        self._module, self._original = memory_bank.MemoryBank, memory_bank.MemoryBank.read
        timer = self

        def timed_read(bank, *args, **kwargs):
            if timer.device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                out = timer._original(bank, *args, **kwargs)
                end.record()
                timer.pending.append((start, end))
            else:
                tick = time.perf_counter()
                out = timer._original(bank, *args, **kwargs)
                timer.pending.append((time.perf_counter() - tick) * 1e3)
            return out
        self._module.read = timed_read

    def collect_ms(self):
        total = sum(p if isinstance(p, float) else p[0].elapsed_time(p[1]) for p in self.pending)
        self.pending = []
        return total

    def close(self):
        self._module.read = self._original


def read_timed(options):
    """Whether a variant's reads are timed one by one: not inside a compiled graph (CUDA
    graphs hold the read too, over the memory's whole capacity), but where the segmenter keeps
    them eager between its graphs (offloaded or sharded memory)."""
    from stm_model.inference.video_segmenter import uses_cuda_graphs
    compile = options.get("compile", False)
    return not compile or (isinstance(compile, dict) and uses_cuda_graphs(compile) and
                           bool(options.get("offload") or options.get("shard_memory")))


def peak_bytes(device):
    """Peak memory so far: the CUDA allocator's peak, or the resident set's high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return common.status_bytes("VmHWM")


def reserved_frames(spec):
    """With --reserve-memory, the memory frames of the longest length plus the previous frame
    and a spare (VideoSegmenter(max_memory_frames=...) allocates them up front and never
    evicts below that); else None (the bank grows by doubling)."""
    if not spec.get("reserve_memory"):
        return None
    return -(-max(spec["lengths"]) // spec["mem_every"]) + 2


def memory_frame_bytes(segmenter, frame_size, num_objects):
    """Bytes one memory frame of num_objects objects takes in the segmenter's bank (its dtype,
    an 8-bit memory's scales included) for frames of frame_size (H, W), at the size the network
    sees them (max_internal_size, padded to multiples of 16)."""
    from stm_model.inference.options import internal_size
    height, width = internal_size(tuple(frame_size), segmenter.max_internal_size)
    padded = (-(-height // 16) * 16, -(-width // 16) * 16)
    return segmenter.new_memory_bank(num_objects, padded, max_frames=2).bytes_per_frame


def chunk_copy_bytes(model, num_objects):
    """Bytes of one read chunk's dequantised copy: CPU_CHUNK positions of every object's keys
    and values widened to float32, then rounded to the read's bf16 (6 bytes an element), the
    most an 8-bit memory's torch read holds beyond a 16-bit one's."""
    from stm_kernels.backends.pytorch import CPU_CHUNK
    config = model.config
    return num_objects * (config.key_dim + config.value_dim) * CPU_CHUNK * (4 + 2)


def run_variant(spec):
    """Segment the long video with one variant; returns its record (run in a fresh process)."""
    from stm_model.inference.video_segmenter import VideoSegmenter
    device = torch.device(spec["device"])
    options = dict(VARIANTS[spec["variant"]])
    if spec.get("memory_dtype"):
        options["memory_dtype"] = spec["memory_dtype"]
    backend = ("triton" if device.type == "cuda" else "torch") if options["read"] == "fused" \
        else "naive"
    torch.manual_seed(0)
    model, model_name = common.build_model(spec["model"], device)
    if options.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    cycle_frames, first_labels, video_name = load_video(
        spec["source"], max(spec["lengths"]), tuple(spec["size"]), spec["sequence"])
    cycle_frames = cycle_frames.to(device)
    input_size = tuple(spec["input_size"]) if spec.get("input_size") else None
    if input_size is not None:
        first_labels = F.interpolate(first_labels[None, None].float(), size=input_size,
                                     mode="nearest")[0, 0].long()

    def frame_at(t):  # upscaled to the input resolution outside the timed step
        frame = cycle_frames[ping_pong(t, len(cycle_frames))]
        if input_size is None:
            return frame
        return F.interpolate(frame[None], size=input_size, mode="bilinear",
                             align_corners=False)[0]

    segmenter = VideoSegmenter(model, mem_every=spec["mem_every"],
                               max_memory_frames=reserved_frames(spec),
                               memory_dtype=options.get("memory_dtype"),
                               offload=options.get("offload", False), read_backend=backend,
                               amp_dtype="bf16" if device.type == "cuda" else None,
                               max_internal_size=spec.get("max_internal_size"),
                               compile=options.get("compile", False))
    budget = {}
    if spec.get("max_memory_bytes"):
        num_objects = len([i for i in first_labels.unique().tolist() if i > 0])
        frame_bytes = memory_frame_bytes(segmenter, tuple(first_labels.shape), num_objects)
        frames = spec["max_memory_bytes"] // frame_bytes
        if frames < 2:
            raise ValueError(f"--max-memory-bytes {spec['max_memory_bytes']} holds {frames} "
                             f"memory frames of {frame_bytes} bytes; a memory needs at least 2")
        segmenter = segmenter.with_options(max_memory_frames=frames)
        budget = dict(memory_frame_bytes=frame_bytes, budget_frames=frames,
                      chunk_copy_bytes=chunk_copy_bytes(model, num_objects))
    warmup_s = None
    warmup = max(spec.get("warmup") or 0, COMPILE_WARMUP_FRAMES if options.get("compile") else 0)
    if warmup:  # first-call costs (compilation, allocator, kernel selection) off the clock
        tick = time.perf_counter()
        with torch.inference_mode():
            warm = segmenter.with_options()
            for t in range(warmup):
                warm.labels(warm.step(frame_at(t), mask=first_labels if t == 0 else None)).cpu()
            del warm
        warmup_s = time.perf_counter() - tick
    timer = _ReadTimer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        common.reset_peak_rss()
    baseline = common.status_bytes("VmRSS") if device.type == "cpu" else \
        torch.cuda.memory_allocated(device)
    frame_ms, read_ms, memory_frames, checkpoints = [], [], [], []
    status = "ok"
    limit = spec.get("time_limit")

    def checkpoint(length):
        return dict(length=length, fps=length / (sum(frame_ms) / 1e3),
                    fps_last_100=min(100, length) / (sum(frame_ms[-100:]) / 1e3),
                    peak_mem_bytes=peak_bytes(device) - baseline,
                    memory_frames=segmenter.memory_frames,
                    memory_bytes=segmenter.memory_bytes,
                    memory_held_bytes=segmenter.memory_held_bytes,
                    memory_bytes_per_frame=segmenter.memory_bytes_per_frame)
    try:
        with torch.inference_mode():
            started = time.perf_counter()
            for t in range(max(spec["lengths"])):
                frame = frame_at(t)
                tick = time.perf_counter()
                probs = segmenter.step(frame, mask=first_labels if t == 0 else None)
                segmenter.labels(probs).cpu()  # the mask a user gets: synchronises
                frame_ms.append((time.perf_counter() - tick) * 1e3)
                read_ms.append(timer.collect_ms())
                memory_frames.append(segmenter.memory_frames)
                if t + 1 in spec["lengths"]:
                    checkpoints.append(checkpoint(t + 1))
                if limit and time.perf_counter() - started > limit and \
                        t + 1 < max(spec["lengths"]):
                    status = f"time limit ({limit:g} s) at frame {t + 1}"
                    if t + 1 not in spec["lengths"]:
                        checkpoints.append(checkpoint(t + 1))
                    break
    except KeyboardInterrupt:  # the run's frames so far are its result (run_isolated)
        frames_done = min(len(frame_ms), len(read_ms), len(memory_frames))
        del frame_ms[frames_done:], read_ms[frames_done:], memory_frames[frames_done:]
        status = f"interrupted at frame {frames_done}"
        if frames_done and (not checkpoints or checkpoints[-1]["length"] != frames_done):
            checkpoints.append(checkpoint(frames_done))
    except (torch.cuda.OutOfMemoryError, RuntimeError, MemoryError) as error:
        if not isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) and \
                "out of memory" not in str(error).lower():
            raise
        status = f"oom at frame {len(frame_ms)} ({len(frame_ms) // spec['mem_every']} " \
                 "memory frames)"
    finally:
        timer.close()
    stride = max(1, len(frame_ms) // 1000)  # keep the JSON small: at most ~1,000 samples
    network_size = None
    if segmenter.banks:
        bank = segmenter.banks[0]
        network_size = [bank.size[0] * 16, bank.size[1] * 16]  # padded to a multiple of 16
    return dict(spec, status=status, model_name=model_name, video=video_name,
                read_backend=backend, checkpoints=checkpoints, sample_stride=stride, **budget,
                frame_index=list(range(0, len(frame_ms), stride)),
                frame_ms=frame_ms[::stride], read_ms=read_ms[::stride],
                memory_frames=memory_frames[::stride], warmup_s=warmup_s,
                read_timed=read_timed(options), network_size=network_size)


def write_moving_shapes(folder, length, size):
    """An H.264 video of `length` frames at size (H, W) in folder, and its first frame's mask:
    a red disc on a Lissajous path (object 1) and a blue box sliding across (object 2) over a
    colour gradient. Returns (video path, mask path)."""
    import av
    from stm_model import io as video_io
    height, width = size
    rows, columns = np.mgrid[0:height, 0:width]
    background = np.stack([columns * 255 // width, rows * 255 // height,
                           np.full_like(rows, 80)], -1).astype(np.uint8)
    folder = pathlib.Path(folder)
    video, mask = folder / f"shapes_{height}p.mp4", folder / f"shapes_{height}p_mask.png"
    container = av.open(str(video), "w")
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for t in range(length):
        image, labels = background.copy(), np.zeros((height, width), np.uint8)
        x = width / 2 + width / 3 * np.sin(t / 40)
        y = height / 2 + height / 4 * np.cos(t / 55)
        disc = (columns - x) ** 2 + (rows - y) ** 2 < (height / 6) ** 2
        image[disc], labels[disc] = (230, 40, 40), 1
        left = (3 * t) % (width - height // 4)
        top = int(height / 2 + height / 5 * np.sin(t / 30))
        box = (slice(top, top + height // 5), slice(left, left + height // 4))
        image[box], labels[box] = (40, 40, 230), 2
        if t == 0:
            video_io.write_mask(mask, labels)
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return video, mask


def run_command(spec):
    """`stm segment` on spec's video (a child process: `_run_command_isolated`), with the
    resident set and the memory bank recorded after every frame; a time limit stops it as
    Ctrl-C would (the command keeps the masks written and says so)."""
    from stm_model.cli import main as stm
    from stm_model.inference.video_segmenter import VideoSegmenter
    samples = []
    step, limit = VideoSegmenter.step, spec.get("time_limit")
    started = time.perf_counter()

    def recorded(segmenter, *args, **kwargs):
        tick = time.perf_counter()
        probs = step(segmenter, *args, **kwargs)
        held = sum(bank.local_frames * bank.bytes_per_frame for bank in segmenter.banks)
        samples.append((time.perf_counter() - tick, common.status_bytes("VmRSS"), held,
                        segmenter.memory_bytes, segmenter.memory_frames))
        if limit and time.perf_counter() - started > limit:
            raise KeyboardInterrupt
        return probs
    VideoSegmenter.step = recorded
    with tempfile.TemporaryDirectory() as output:
        arguments = ["segment", spec["video"], "--mask", spec["mask"], "--output", output,
                     "--overlay", "none", "--quiet", "--max-frames", str(spec["length"]),
                     *spec.get("segment_options", [])]
        tick = time.perf_counter()
        code = stm(arguments)
        wall_s = time.perf_counter() - tick  # the command's whole run, start-up included
    frames = len(samples)
    status = "ok" if code == 0 else \
        f"time limit ({limit:g} s) at frame {frames}" if code == 130 else f"exit code {code}"
    stride = max(1, frames // 1000)  # keep the JSON small: at most ~1,000 samples
    step_s, rss, held, capacity, memory_frames = (
        [sample[i] for sample in samples] for i in range(5))
    return dict(spec, status=status, frames=frames, wall_s=wall_s,
                peak_rss_bytes=common.status_bytes("VmHWM"),
                sample_stride=stride, frame_index=list(range(1, frames + 1))[::stride],
                frame_ms=[s * 1e3 for s in step_s[::stride]], rss_bytes=rss[::stride],
                bank_bytes=held[::stride], capacity_bytes=capacity[::stride],
                memory_frames=memory_frames[::stride],
                fps=frames / sum(step_s) if frames else None, growth=command_growth(rss, held))


def command_growth(rss, held, start=GROWTH_FROM):
    """From frame `start` on (1-based): the resident set's growth, the bank's, and the first's
    excess over the second (None for a run shorter than that)."""
    if len(rss) <= start:
        return None
    return dict(start=start, end=len(rss), rss=rss[-1] - rss[start - 1],
                bank=held[-1] - held[start - 1],
                beyond_bank=(rss[-1] - rss[start - 1]) - (held[-1] - held[start - 1]))


def _run_command_isolated(spec, tree=None):
    """run_command(spec) in a fresh process (glibc's allocator as it is) whose stm_model and
    stm_kernels are tree's (default: this checkout's), bench this checkout's."""
    root = pathlib.Path(__file__).resolve().parents[1]
    paths = [str(tree), str(root)] if tree else [str(root)]
    code = (f"import json, sys; sys.path[:0] = {paths!r}; from bench import long_video; "
            "print(json.dumps(long_video.run_command(json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True,
                          text=True, cwd=tempfile.gettempdir(), timeout=6 * 3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                           else f"exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def command_main(args, device):
    """--command: `stm segment` on synthetic videos of each size (see the module docstring)."""
    length = max(args.lengths or [2000])
    payload = common.environment(device)
    payload.update(benchmark="long_video", command="stm segment", lengths=[length],
                   sizes={name: list(COMMAND_SIZES[name]) for name in args.command},
                   segment_options=args.segment_options or [], growth_from=GROWTH_FROM,
                   compare_with=str(args.compare_with) if args.compare_with else None,
                   video="synthetic moving shapes (H.264)", model_name="small-real (default)",
                   records=[])
    this, compared = args.tree_names
    trees = [(this, None)] + ([(compared, args.compare_with)] if args.compare_with else [])
    with tempfile.TemporaryDirectory() as folder:
        for name in args.command:
            video, mask = write_moving_shapes(folder, length, COMMAND_SIZES[name])
            for repeat in range(args.repeats):
                for tree, path in trees:
                    spec = dict(size_name=name, size=list(COMMAND_SIZES[name]), length=length,
                                video=str(video), mask=str(mask), tree=tree, repeat=repeat,
                                segment_options=args.segment_options or [],
                                time_limit=args.time_limit)
                    record = _run_command_isolated(spec, path)
                    for key in ("video", "mask"):
                        record.pop(key)
                    payload["records"].append(record)
                    growth = record["growth"] or {}
                    print(f"{name} {tree:8} {record['status']:8} {record['frames']} frames "
                          f"{record['fps']:.2f} fps, RSS +{growth.get('rss', 0) / 2**20:.0f} "
                          f"MiB from frame {GROWTH_FROM}, bank +"
                          f"{growth.get('bank', 0) / 2**20:.0f} MiB", flush=True)
                    common.save_progress("long_video", payload)
    common.finish_run("long_video", payload, plot, summary)
    return 0


def _command_summary(payload):
    """--command's table: per size, tree and run, the frames, fps, the resident set and the
    bank at the end, and their growth from frame growth_from."""
    start = payload["growth_from"]
    options = " ".join(payload.get("segment_options") or []) or "its defaults"
    rows = [f"Video: {payload['video']}, `stm segment` with {options} and --overlay none, "
            f"{payload['model_name']}; growth counted from frame {start}.", "",
            "| size | tree | frames | memory frames | fps | RSS MiB | RSS growth MiB | "
            "bank MiB | bank growth MiB | growth beyond the bank MiB | capacity MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for record in payload["records"]:
        growth = record.get("growth") or {}

        def mib(key, values=growth):
            return f"{values[key] / 2**20:.0f}" if key in values else "-"
        height, width = record["size"]
        rows.append(f"| {width}x{height} | {record['tree']} | {record['frames']} | "
                    f"{record['memory_frames'][-1]} | {record['fps']:.2f} | "
                    f"{record['rss_bytes'][-1] / 2**20:.0f} | {mib('rss')} | "
                    f"{record['bank_bytes'][-1] / 2**20:.0f} | {mib('bank')} | "
                    f"{mib('beyond_bank')} | {record['capacity_bytes'][-1] / 2**20:.0f} |")
        if record["status"] != "ok":
            rows.append(f"| {width}x{height} | {record['tree']} | {record['status']} "
                        "| | | | | | | | |")
    return "\n".join(rows)


def _command_plot(payload, path):
    """The resident set and the bank against frames (left), and their growth from frame
    growth_from (right); returns [path]."""
    figure, (absolute, growth) = common.subplots(1, 2, figsize=(12, 4.5))
    start = payload["growth_from"]
    banks = set()  # sizes whose bank is drawn: every tree's bank is the same
    for i, record in enumerate(payload["records"]):
        if record.get("repeat", 0):
            continue  # one run of each: the repeats are for speed
        colour = f"C{i}"
        height, width = record["size"]
        size = f"{width}x{height}"
        label = size + (f" ({record['tree']})" if payload.get("compare_with") else "")
        frames = np.asarray(record["frame_index"])
        rss = np.asarray(record["rss_bytes"]) / 2**20
        bank = np.asarray(record["bank_bytes"]) / 2**20
        at = int(np.searchsorted(frames, start))
        absolute.plot(frames, rss, color=colour, label=f"{label}: resident set")
        if at < len(frames):
            growth.plot(frames[at:], rss[at:] - rss[at], color=colour,
                        label=f"{label}: resident set")
        if size in banks:
            continue
        banks.add(size)
        absolute.plot(frames, bank, color=colour, linestyle="--", label=f"{size}: bank")
        if at < len(frames):
            growth.plot(frames[at:], bank[at:] - bank[at], color=colour, linestyle="--",
                        label=f"{size}: bank")
            growth.plot(frames[at:], bank[at:] - bank[at] + 100, color=colour, linestyle=":",
                        linewidth=1, label=f"{size}: bank + 100 MiB")
    absolute.set(xlabel="frame", ylabel="MiB", ylim=(0, None))
    growth.set(xlabel="frame", ylabel=f"MiB grown since frame {start}")
    for axis in (absolute, growth):
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.suptitle(f"`stm segment` on a long video, {payload['device']} (torch "
                    f"{payload['torch']}, commit {payload['commit'][:12]}, "
                    f"{payload['date'][:10]}): resident set and memory bank", fontsize=9)
    return common.save_figure(figure, path, dpi=100)


def summary(payload):
    """Markdown table: per variant and length, fps, memory and the read's share of a frame
    (with --input-resolutions, per input resolution instead). "beyond memory" is the peak less
    the memory bank: a frame's working memory, flat where only the bank grows (the fused read),
    growing with the memory where the read materialises the affinity (the naive one); "-" where
    the bank is offloaded to the host. It includes the bank's growth copy: when the bank
    doubles, its old storage (half the new) is held beside the new while the frames are
    copied; the fused and naive reads share that term. A --command run: _command_summary."""
    if payload.get("command"):
        return _command_summary(payload)
    if any(record.get("input_size") for record in payload["records"]):
        return _resolutions_summary(payload)
    reserved = ", the memory bank allocated up front for the longest length" \
        if payload.get("reserve_memory") else ""
    if payload.get("max_memory_bytes"):
        reserved += (f", a memory bank budget of {payload['max_memory_bytes']:,} bytes "
                     f"({payload['max_memory_bytes'] / 2**20:.1f} MiB)")
    rows = [f"Video: {payload['video']}, {payload['size'][1]}x{payload['size'][0]}, "
            f"{payload['model_name']}, mem_every={payload['mem_every']}{reserved}.", "",
            "| variant | read | frames | memory frames | fps | fps (last 100) | peak MiB | "
            "memory MiB | beyond memory MiB | read ms/frame (last) | rest ms/frame (last) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for record in payload["records"]:
        ends = _last_read_and_rest(record)
        variant = _label(record)
        for c in record["checkpoints"]:
            read, rest = (f"{value:.2f}" for value in ends[c["length"]]) \
                if record.get("read_timed", True) else ("-", "-")
            rows.append(f"| {variant} | {record['read_backend']} | {c['length']} | "
                        f"{c['memory_frames']} | {c['fps']:.1f} | {c['fps_last_100']:.1f} | "
                        f"{common.mib(c['peak_mem_bytes'])} | {c['memory_bytes'] / 2**20:.0f} | "
                        f"{common.mib(_beyond_memory(record, c))} | {read} | {rest} |")
        if record["status"] != "ok":
            rows.append(f"| {variant} | {record['read_backend']} | "
                        f"{record['status']} | | | | | | | | |")
    if payload.get("max_memory_bytes"):
        rows += ["", _budget_summary(payload)]
    return "\n".join(rows)


def _label(record):
    """A record's variant, with its memory dtype where --memory-dtype set one."""
    return record["variant"] + (f" {record['memory_dtype']}" if record.get("memory_dtype")
                                else "")


def _budget_summary(payload):
    """--max-memory-bytes' table: per run, the bytes of a memory frame, the frames the budget
    holds (and their ratio to the first run's, e.g. bf16's), the frames and bytes held at the
    end, and the peak beyond the bank at the end, its excess over the first run's against one
    read chunk's dequantised copy."""
    records = [r for r in payload["records"] if r.get("budget_frames")]
    if not records:
        return ""
    first = records[0]
    first_end = first["checkpoints"][-1] if first["checkpoints"] else None
    rows = [f"Within the budget, against {_label(first)}:", "",
            "| variant | bytes per memory frame | memory frames the budget holds | "
            f"x {_label(first)} | memory frames at the end | held MiB | beyond memory MiB | "
            f"beyond memory - {_label(first)}'s, MiB | one chunk's dequantised copy, MiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for record in records:
        end = record["checkpoints"][-1] if record["checkpoints"] else None
        beyond = _beyond_memory(record, end) if end else None
        first_beyond = _beyond_memory(first, first_end) if first_end else None
        excess = "-" if beyond is None or first_beyond is None else \
            f"{(beyond - first_beyond) / 2**20:+.1f}"
        held = end.get("memory_held_bytes") if end else None
        rows.append(f"| {_label(record)} | {record['memory_frame_bytes']:,} | "
                    f"{record['budget_frames']} | "
                    f"{record['budget_frames'] / first['budget_frames']:.2f} | "
                    f"{end['memory_frames'] if end else '-'} | "
                    f"{'-' if held is None else f'{held / 2**20:.1f}'} | "
                    f"{common.mib(beyond)} | {excess} | "
                    f"{record['chunk_copy_bytes'] / 2**20:.1f} |")
    return "\n".join(rows)


def _beyond_memory(record, checkpoint):
    """Bytes of a checkpoint's peak beyond its memory bank, or None where the bank is not on
    the device the peak measures (offload) or the peak is unknown."""
    if VARIANTS.get(record["variant"], {}).get("offload") or \
            checkpoint["peak_mem_bytes"] is None:
        return None
    return checkpoint["peak_mem_bytes"] - checkpoint["memory_bytes"]


def _last_read_and_rest(record):
    """{checkpoint length: (read ms, rest ms) of the last sampled frame before it}."""
    ends = {}
    for length in (c["length"] for c in record["checkpoints"]):
        index = max(i for i, f in enumerate(record["frame_index"]) if f < length)
        ends[length] = (record["read_ms"][index],
                        record["frame_ms"][index] - record["read_ms"][index])
    return ends


def _resolutions_summary(payload):
    """The --input-resolutions table: per input resolution and variant, the network's size,
    memory per memory frame, fps and peak memory."""
    internal = payload.get("max_internal_size")
    rows = [f"Video: {payload['video']}, cycle at {payload['size'][1]}x{payload['size'][0]} "
            f"upscaled to each input resolution, {payload['model_name']}, "
            f"mem_every={payload['mem_every']}, max_internal_size={internal}.", "",
            "| input | variant | network size | frames | memory frames | KiB per memory frame "
            "| fps | peak MiB | warm-up s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for record in payload["records"]:
        height, width = record["input_size"]
        network = record.get("network_size")
        network = f"{network[1]}x{network[0]}" if network else "-"
        warmup = f"{record['warmup_s']:.1f}" if record.get("warmup_s") is not None else "-"
        for c in record["checkpoints"]:
            rows.append(f"| {width}x{height} | {record['variant']} | {network} | {c['length']} | "
                        f"{c['memory_frames']} | {c['memory_bytes_per_frame'] / 2**10:.0f} | "
                        f"{c['fps']:.2f} | {common.mib(c['peak_mem_bytes'])} | {warmup} |")
        if record["status"] != "ok":
            rows.append(f"| {width}x{height} | {record['variant']} | {record['status']} "
                        "| | | | | | |")
    return "\n".join(rows)


def _smooth(values, window=25):
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot(payload, path):
    """fps, peak memory, read time and the rest of the frame time; returns [path] (a
    --command run: _command_plot)."""
    if payload.get("command"):
        return _command_plot(payload, path)
    figure, axes = common.subplots(2, 2, figsize=(12, 8))
    (fps_axis, memory_axis), (read_axis, rest_axis) = axes
    for i, record in enumerate(payload["records"]):
        colour = f"C{i}"
        label = _label(record) + (f" {record['input_size'][1]}x{record['input_size'][0]}"
                                  if record.get("input_size") else "")
        lengths = [c["length"] for c in record["checkpoints"]]
        fps_axis.plot(lengths, [c["fps"] for c in record["checkpoints"]], marker="o",
                      color=colour, label=label)
        memory_axis.plot(lengths, [np.nan if c["peak_mem_bytes"] is None else
                                   c["peak_mem_bytes"] / 2**20 for c in record["checkpoints"]],
                         marker="o", color=colour, label=label)
        if record["status"] != "ok":
            for axis in (fps_axis, memory_axis):
                axis.axvline(len(record["frame_ms"]) * record["sample_stride"], color=colour,
                             linestyle=":", linewidth=1)
        if not record.get("read_timed", True):
            continue  # compiled: no per-read times
        frames = np.asarray(record["memory_frames"][1:])
        read = np.asarray(record["read_ms"][1:])
        rest = np.asarray(record["frame_ms"][1:]) - read
        window = 25
        if len(frames) >= window:
            frames = frames[window - 1:]
        read_axis.plot(frames, _smooth(read), color=colour, label=label)
        rest_axis.plot(frames, _smooth(rest), color=colour, label=label)
    fps_axis.set(xscale="log", xlabel="video length (frames)", ylabel="fps (whole video so far)")
    memory_axis.set(xscale="log", yscale="log", xlabel="video length (frames)",
                    ylabel="peak memory (MiB)")
    read_axis.set(xlabel="memory frames", ylabel="memory read ms per frame (smoothed)")
    rest_axis.set(xlabel="memory frames", ylabel="rest of the frame time, ms (smoothed)")
    rest_axis.set_ylim(bottom=0)
    read_axis.set_ylim(bottom=0)
    for axis in axes.flat:
        axis.legend(fontsize=7)
    figure.suptitle(f"Long video on {payload['device']} ({payload['model_name']}, "
                    f"{payload['size'][1]}x{payload['size'][0]}, {payload['video']}; torch "
                    f"{payload['torch']}, {payload['date'][:10]}); dotted: out of memory",
                    fontsize=9)
    return common.save_figure(figure, path, dpi=100)


def main(argv=None):
    """`python -m bench long-video`; returns the exit code."""
    parser = common.benchmark_parser(__doc__, "python -m bench long-video")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--lengths", nargs="+", type=int)
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--model", choices=["small", "official"])
    parser.add_argument("--source", help="a DAVIS-format root, or 'synthetic' (default: "
                                         "../shared/data/davis2016-val when present)")
    parser.add_argument("--sequence", help="DAVIS sequence (default: the first by name)")
    parser.add_argument("--mem-every", type=int, default=5)
    parser.add_argument("--input-resolutions", nargs="+", choices=sorted(INPUT_RESOLUTIONS),
                        help="run each variant at these input resolutions (frames upscaled "
                             "from the --size cycle), with --max-internal-size")
    parser.add_argument("--max-internal-size", type=int,
                        help="VideoSegmenter(max_internal_size=...): the network sees frames "
                             "whose shorter side is at most this (default with "
                             "--input-resolutions: 480; 0: the input size)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop each variant after this many seconds of segmenting "
                             "(recorded, with a checkpoint at the frame reached)")
    parser.add_argument("--reserve-memory", action="store_true",
                        help="allocate the memory bank for the longest length up front "
                             "(VideoSegmenter(max_memory_frames=...)): no doubling copy, so "
                             "the peak beyond the bank is the frame's own working memory")
    parser.add_argument("--memory-dtype", nargs="+", dest="memory_dtypes", metavar="DTYPE",
                        choices=[d for d in MEMORY_DTYPES if d != "auto"],
                        help="run each variant once per memory dtype (VideoSegmenter's "
                             "memory_dtype; not with a variant that sets its own)")
    parser.add_argument("--max-memory-bytes", type=int, metavar="BYTES",
                        help="a fixed budget for the memory bank: each run keeps the memory "
                             "frames of its dtype that fit (max_memory_frames), evicting the "
                             "oldest past that")
    parser.add_argument("--command", nargs="+", choices=sorted(COMMAND_SIZES),
                        help="run `stm segment` itself on a synthetic video of each size, "
                             "recording its resident set and memory bank after every frame "
                             "(length: the longest of --lengths, default 2000)")
    parser.add_argument("--segment-options", nargs="+", metavar="OPTION",
                        help="with --command: more `stm segment` options (e.g. "
                             "--memory-dtype fp32)")
    parser.add_argument("--compare-with", type=pathlib.Path, metavar="DIR",
                        help="with --command: alternate every run with one on the stm_model "
                             "and stm_kernels in DIR (another commit's, exported)")
    parser.add_argument("--tree-names", nargs=2, default=["this", "compared"],
                        metavar=("THIS", "COMPARED"),
                        help="with --compare-with: the two trees' names in the results")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --command: runs of each size (alternating with "
                             "--compare-with's)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="frames segmented by a separate segmenter before timing (at least "
                             f"{COMPILE_WARMUP_FRAMES} for compiled variants)")
    args = common.parse_args_or_run_child(parser, argv, run_variant)
    if args is None:
        return 0
    device = common.pick_device(args.device)
    if args.command:
        return command_main(args, device)
    defaults = DEFAULTS[device.type]
    variants = args.variants or defaults["variants"]
    if args.memory_dtypes:
        own = [v for v in variants if "memory_dtype" in VARIANTS[v]]
        if own:
            parser.error(f"--memory-dtype: the variants {', '.join(own)} set their own memory "
                         "dtype; choose others (e.g. --variants fused)")
    if args.max_memory_bytes is not None and args.max_memory_bytes < 1:
        parser.error(f"--max-memory-bytes must be a positive number of bytes; got "
                     f"{args.max_memory_bytes}")
    if args.max_memory_bytes and args.reserve_memory:
        parser.error("--max-memory-bytes bounds the bank; --reserve-memory sizes it for the "
                     "longest length: give one")
    source = args.source or (str(SHARED_DAVIS) if SHARED_DAVIS.exists() else "synthetic")
    lengths = sorted(args.lengths or defaults["lengths"])
    max_internal_size = args.max_internal_size
    if args.input_resolutions and max_internal_size is None:
        max_internal_size = 480
    max_internal_size = max_internal_size or None  # 0: the input size
    size = args.size or (INPUT_RESOLUTIONS["480p"] if args.input_resolutions
                         else defaults["size"])
    spec = dict(device=str(device), model=args.model or defaults["model"],
                size=list(size), lengths=lengths, source=source,
                sequence=args.sequence, mem_every=args.mem_every,
                max_internal_size=max_internal_size, warmup=args.warmup,
                time_limit=args.time_limit, reserve_memory=args.reserve_memory,
                max_memory_bytes=args.max_memory_bytes)
    payload = common.environment(device)
    payload.update(benchmark="long_video", **{k: v for k, v in spec.items() if k != "device"},
                   peak_mem_note=("CUDA: allocator peak above what was allocated before the "
                                  "first frame; CPU: resident-set high-water mark above the "
                                  "resident set before the first frame (fresh process)"),
                   records=[])
    if args.input_resolutions:
        payload["input_resolutions"] = args.input_resolutions
    if args.memory_dtypes:  # a run of these memory dtypes (bench report keeps it apart)
        payload["dtypes"] = args.memory_dtypes
    runs = [(variant, resolution, memory_dtype)
            for resolution in args.input_resolutions or [None]
            for variant in variants for memory_dtype in args.memory_dtypes or [None]]
    for variant, resolution, memory_dtype in runs:
        run_spec = dict(spec, variant=variant, memory_dtype=memory_dtype,
                        input_size=list(INPUT_RESOLUTIONS[resolution]) if resolution else None)
        try:
            record = common.speed_then_peak_over_lengths(
                "bench.long_video", run_spec, device, lambda record: record["checkpoints"],
                timeout=6 * 3600)
        except common.Interrupted as stop:
            common.keep_interrupted("long_video", payload, stop)
            raise
        payload["records"].append(record)
        payload.setdefault("video", record["video"])
        payload.setdefault("model_name", record["model_name"])
        last = record["checkpoints"][-1] if record["checkpoints"] else None
        shown = (f"{last['length']} frames {last['fps']:.1f} fps "
                 f"{common.mib(last['peak_mem_bytes'])} MiB" if last else "")
        print(f"{_label(record):20} {resolution or '':6} {record['status']:8} {shown}",
              flush=True)
        common.save_progress("long_video", payload)  # a cut-off run keeps its variants
    common.finish_run("long_video", payload, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
