"""Shared test utilities: devices, tolerances, the float64 reference, ../shared."""
import collections
import pathlib
import signal

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stm_kernels.selftest import relative_error  # noqa: F401 (the one error measure)
from stm_kernels import memory_read
from stm_kernels.backends.triton import devices
from reference import reference_read

# Real data and references beside the checkout; tests that use them skip when it is absent.
SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]

# Normalised RMS error bounds (relative_error) against a float64 reference: fp32 is exact
# float32 arithmetic (the GPU path follows torch's default "highest" matmul precision).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def ctrl_c_as_at_a_terminal():
    """A subprocess's preexec_fn: SIGINT's default action, as a command typed at a terminal has
    it, even when the tests run as a background job (`make test &`, nohup), which ignores SIGINT
    and passes that on to every process it starts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def skip_unless_runnable(backend, device, dtype=torch.float32):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend == "triton" and device == "cpu" and not devices.INTERPRETING:
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    if dtype == torch.bfloat16 and device == "cpu" and backend == "triton":
        pytest.skip("bf16 tl.dot is unreliable in the Triton interpreter; tested on GPU")


def captured_graph(read, *inputs):
    """(graph, the outputs it writes) of read(*inputs) captured in a CUDA graph, after two
    warm-up calls on a side stream (torch.cuda.graph's recipe: nothing of the warm-up lands in
    the graph); a replay reads whatever the captured inputs hold by then."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            read(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = read(*inputs)
    return graph, outputs


def random_inputs(B, Bq, Ck, Cv, HW, N, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(Bq, Ck, HW, generator=generator, dtype=torch.float64)
    k = torch.randn(B, Ck, N, generator=generator, dtype=torch.float64)
    v = torch.randn(B, Cv, N, generator=generator, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def read_with_grads(q, k, v, seed=1, **kwargs):
    """Run memory_read with return_lse=True and backpropagate random cotangents into both outputs;
    return [out, lse, dq, dk, dv]."""
    q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = memory_read(q, k, v, return_lse=True, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=generator, dtype=torch.float64)
    loss = (out * grad_out.to(out)).sum() + (lse * grad_lse.to(lse)).sum()
    loss.backward()
    return [out, lse, q.grad, k.grad, v.grad]


def reference_with_grads(q, k, v, seed=1, memory_lengths=None, **kwargs):
    """The same on float64 CPU copies with the read written out in plain torch
    (reference.reference_read: no project code), the same cotangents."""
    q, k, v = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    out, lse, _ = reference_read(q, k, v, lengths=memory_lengths, **kwargs)
    out = out.unflatten(2, q.shape[2:])
    lse = lse.unflatten(1, q.shape[2:])
    generator = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=generator, dtype=torch.float64)
    ((out * grad_out).sum() + (lse * grad_lse).sum()).backward()
    return [out.detach(), lse.detach(), q.grad, k.grad, v.grad]


def check_read(results, expected, dtype, grad_factor=3):
    """[out, lse, dq, dk, dv] against a reference within TOLERANCE[dtype] (gradients
    grad_factor times it); None entries of the reference are skipped."""
    names = ["out", "lse", "dq", "dk", "dv"]
    for name, actual, reference in zip(names, results, expected, strict=True):
        if reference is None:
            continue
        bound = TOLERANCE[dtype] * (1 if name in ("out", "lse") else grad_factor)
        assert actual.shape == reference.shape, name
        error = relative_error(actual, reference)
        assert error < bound, f"{name}: relative error {error:.2e} > {bound:.0e}"


def ragged_case(device, seed, cotangent_seed, lengths=(160, 20)):
    """(q, k, v, lengths, cotangents): two objects of a padded memory of 160 positions, a
    shared query (Ck 16, Cv 24, HW 30) and float64 cotangents for out and lse."""
    B, Ck, Cv, HW, N = len(lengths), 16, 24, 30, 160
    q, k, v = random_inputs(B, 1, Ck, Cv, HW, N, torch.float32, device, seed=seed)
    generator = torch.Generator().manual_seed(cotangent_seed)
    cotangents = (torch.randn(B, Cv, HW, generator=generator, dtype=torch.float64),
                  torch.randn(B, HW, generator=generator, dtype=torch.float64))
    return q, k, v, list(lengths), cotangents


def ragged_read_with_grads(q, k, v, lengths, cotangents, **kwargs):
    """read_with_grads for a ragged memory (memory_lengths) and given cotangents."""
    q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = memory_read(q, k, v, memory_lengths=lengths, return_lse=True, **kwargs)
    grad_out, grad_lse = cotangents
    ((out * grad_out.to(out)).sum() + (lse * grad_lse.to(lse)).sum()).backward()
    return [out, lse, q.grad, k.grad, v.grad]


def per_object_reference(q, k, v, lengths, cotangents, **kwargs):
    """Each object read alone over its own memory slice, in float64 with the read written out
    in plain torch (reference.reference_read)."""
    grad_out, grad_lse = cotangents
    q64 = q.detach().double().cpu().requires_grad_()
    results = [[], [], None, torch.zeros(k.shape, dtype=torch.float64),
               torch.zeros(v.shape, dtype=torch.float64)]
    for b, length in enumerate(lengths):
        k_b = k[b:b + 1, :, :length].detach().double().cpu().requires_grad_()
        v_b = v[b:b + 1, :, :length].detach().double().cpu().requires_grad_()
        q_b = q64[b:b + 1] if q.shape[0] > 1 else q64
        out, lse, _ = reference_read(q_b, k_b, v_b, **kwargs)
        ((out * grad_out[b:b + 1]).sum() + (lse * grad_lse[b:b + 1]).sum()).backward()
        results[0].append(out.detach())
        results[1].append(lse.detach())
        results[3][b, :, :length], results[4][b, :, :length] = k_b.grad[0], v_b.grad[0]
    return [torch.cat(results[0]), torch.cat(results[1]), q64.grad, results[3], results[4]]


def synthetic_video(frames, size=(64, 64), seed=3, objects=2):
    """(frames (T, 3, H, W) float in [0, 1], labels (T, H, W)) of a held-out synthetic video."""
    import numpy as np
    from stm_model.training.datasets import HELD_OUT_SEEDS
    from stm_model.training.synthetic import SyntheticVideo
    video = SyntheticVideo(HELD_OUT_SEEDS + seed, *size, num_objects=objects)
    images, labels = zip(*video.frames(frames), strict=True)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), np.stack(labels)


def write_frames(folder, frames, size, seed=4, objects=2):
    """A held-out synthetic video written as PNG frames into a new `folder`; returns its
    (T, H, W) labels."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True)
    images, labels = synthetic_video(frames, size=size, seed=seed, objects=objects)
    for t, image in enumerate(images):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            folder / f"{t:05d}.png")
    return labels


def write_late_object_clip(root, frames=12):
    """A clip in `root` for the commands: frames/ (64 x 96, seed 8), masks/ (frame 0 holds
    object 1, frame 4 brings object 2) and later_masks/ (the first on frame 4:
    --both-directions segments 4..T-1, then 3..0); returns root."""
    import numpy as np

    from stm_model import io as video_io
    labels = write_frames(root / "frames", frames, (64, 96), seed=8, objects=2)
    for name in ("masks", "later_masks"):
        (root / name).mkdir()
    video_io.write_mask(root / "masks" / "00000.png", np.where(labels[0] == 1, 1, 0))
    video_io.write_mask(root / "masks" / "00004.png", np.where(labels[4] == 2, 2, 0))
    video_io.write_mask(root / "later_masks" / "00004.png", labels[4])
    return root


def write_davis_folder(root, frames, labels, name="synth"):
    """A DAVIS-format folder (JPEGImages/480p/<name>, Annotations/480p/<name>) of a video."""
    import numpy as np
    from PIL import Image
    from stm_model import io as video_io
    images = root / "JPEGImages" / "480p" / name
    images.mkdir(parents=True, exist_ok=True)
    for t, (frame, mask) in enumerate(zip(frames, labels, strict=True)):
        array = (frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(images / f"{t:05d}.jpg", quality=95)
        video_io.write_mask(root / "Annotations" / "480p" / name / f"{t:05d}.png",
                            mask.astype(np.uint8))


class RecordedOps(TorchDispatchMode):
    """Within the block, runs every torch operation unchanged and keeps its name: `names`,
    the overloads in call order ("aten.mm.default"); counts(), {op name ("mm"): calls}."""

    def __init__(self):
        super().__init__()
        self.names = []
        self._packets = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        self._packets.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def counts(self):
        return collections.Counter(self._packets)


class NoHostReads(RecordedOps):
    """RecordedOps that fails on any operation reading a device value on the host (a device
    synchronisation per call, and what a CUDA graph capture refuses)."""
    HOST_READS = {"aten._local_scalar_dense.default", "aten.item.default",
                  "aten.nonzero.default", "aten.nonzero_static.default",
                  "aten.is_nonzero.default", "aten.equal.default"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert str(func) not in self.HOST_READS, f"a host read of a device value: {func}"
        return super().__torch_dispatch__(func, types, args, kwargs)
