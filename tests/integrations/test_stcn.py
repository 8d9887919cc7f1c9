"""stm_kernels.integrations.stcn: STCN (stcnbuf) reading memory with memory_read.

The network has seeded random weights (the ImageNet backbones are built without their
downloads); frames are DAVIS's camel from ../shared when present, else a synthetic video.
stcnbuf's segment_video needs a video file and a Mask R-CNN for the first frame, so the tests
run its loop themselves: STCNInference.initialize on the first frame and its 2-object mask,
then predict_batch one frame at a time as `segment_video --passes 2` does (a burn-in pass
into the permanent memory, capped at MEM_SIZE frames so that add_memory evicts, then the
main pass into a 1-frame temporary memory, overwritten in place and read again), under
torch.inference_mode, and, where said, torch.jit.script'ed after initialize as process_video
does.

One difference from segment_video: its passes run over the same frames (the first frame
twice in the burn-in, every frame again in the main pass), which stores identical keys twice,
and identical keys tie exactly at the top-k boundary, where torch.topk picks either twin
(unspecified) and memory_read the lower position. Both are the top-k read, with different
values; so here each step reads a new frame, and the tie order has a test of its own.
"""
import contextlib
import copy
import functools
import math
import subprocess
import sys
import warnings
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("stcnbuf")

import stcnbuf.model.eval_network as eval_network  # noqa: E402
from stcnbuf.inference_memory_bank import MemoryBank  # noqa: E402

from bench.integrations import random_stcn  # noqa: E402
from helpers import SHARED, TOLERANCE, relative_error, synthetic_video  # noqa: E402
from stm_kernels.integrations import stcn as integration  # noqa: E402

SIZE = (64, 112)  # (H, W): 4 x 7 memory positions per frame at 1/16
CAMEL = SHARED / "data" / "davis2016-val"
FRAMES = (0, 5, 10, 15, 20, 25)  # DAVIS frame numbers: the first, 2 burn-in, 3 main pass
MEM_SIZE, TEMP_MEM_SIZE, TOP_K = 2, 1, 20  # segment_video's: 128, 2, 20


# --------------------------------------------------------------------------- model and video


@pytest.fixture(scope="module")
def network(video):
    """stcnbuf's STCN with seeded random weights, nothing downloaded, conditioned in the two
    respects the comparison needs:

    - keys of unit mean square (the key projection rescaled on the first frame): random
      features give keys of norm ~100, whose scores (thousands) make every read a one-hot
      softmax and its float32 rounding (|score| * 2^-24, ~1e-4) larger than the tolerance, for
      any two implementations (STCN's own read on two devices included);
    - the mask inputs of the value encoder's first convolution amplified (x30): random layers
      otherwise barely see the masks, the two objects' values differ by ~1%, and their
      probabilities coincide to within 1e-7 over much of the frame, where the label map is
      decided by rounding.
    """
    network = random_stcn()
    frames, _ = video
    with torch.no_grad():
        key = network.encode_key(new_processor(network).im_transform(frames[0])[None])[0]
        network.key_proj.key_proj.weight /= key.pow(2).mean().sqrt()
        network.value_encoder.conv1.weight[:, 3:] *= 30
    return network


@pytest.fixture(scope="module")
def video():
    """(frames: HxWx3 uint8 images, masks (2, H, W) float32 of the first frame)."""
    if (CAMEL / "JPEGImages").is_dir():
        from PIL import Image
        frames = [np.array(Image.open(CAMEL / f"JPEGImages/480p/camel/{t:05d}.jpg")
                             .resize(SIZE[::-1], Image.BILINEAR)) for t in FRAMES]
        camel = np.asarray(Image.open(CAMEL / "Annotations/480p/camel/00000.png")
                           .resize(SIZE[::-1], Image.NEAREST)) > 0
        # two objects: the camel's left and right halves
        middle = int(np.median(np.nonzero(camel)[1]))
        left = camel & (np.arange(SIZE[1]) < middle)
        masks = np.stack([left, camel & ~left])
    else:
        images, labels = synthetic_video(len(FRAMES), size=SIZE, seed=5, objects=2)
        frames = [(image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                  for image in images]
        masks = np.stack([labels[0] == 1, labels[0] == 2])
    assert masks.any(axis=(1, 2)).all()
    return frames, torch.from_numpy(masks.astype(np.float32))


def new_processor(network):
    return eval_network.STCNInference(network, MEM_SIZE, TEMP_MEM_SIZE, TOP_K, None).eval()


def segment(processor, video, script=False, steps=None, device="cpu"):
    """segment_video's loop (see the module docstring): the aggregated probabilities
    (objects + 1, 1, H, W) of each predict_batch call, the first `steps` of them. On CUDA
    under autocast, as process_video runs it.

    Unscripted on the CPU, the key encoder (a function of the frame alone) runs once per
    network and frame: later runs get clones of its outputs, for speed."""
    frames, masks = video
    schedule = [(frame, False) for frame in frames[1:3]] + [(frame, True) for frame in frames[3:]]
    torch.manual_seed(0)  # add_memory's eviction draws positions with torch.randperm
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.autocast("cuda", enabled=device == "cuda"))
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        if device == "cpu" and not script:
            patch.setattr(processor.prop_model, "encode_key", functools.partial(
                cached_encode_key, processor.prop_model), raising=False)
        with pytest.MonkeyPatch.context() as cuda:
            if device == "cpu":  # initialize sends its frame to CUDA
                cuda.setattr(torch.Tensor, "cuda", lambda tensor, *args, **kwargs: tensor)
            processor.initialize(frames[0], masks.to(device))
        model = processor
        if script:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.script's deprecation
                model = torch.jit.script(processor)
        return [model.predict_batch(processor.im_transform(frame).unsqueeze(0).to(device),
                                    add_last_to_memory=True, is_temp=is_temp)
                for frame, is_temp in schedule[:steps]]


_ENCODED_KEYS = weakref.WeakKeyDictionary()  # network -> {frame: encode_key's outputs}


def cached_encode_key(network, frame):
    """STCN.encode_key(frame), computed once per network and frame."""
    encoded = _ENCODED_KEYS.setdefault(network, {})
    known = (frame.shape, frame.numpy().tobytes())
    if known not in encoded:
        encoded[known] = type(network).encode_key(network, frame)
    return tuple(feature.clone() for feature in encoded[known])


@pytest.fixture(scope="module")
def reference(network, video):
    """The run with STCN's own read."""
    return segment(new_processor(network), video)


@pytest.fixture
def spy(monkeypatch):
    """The keyword arguments and memory chunks of every memory_read call of the integration."""
    calls = []
    memory_read = integration.memory_read

    def recording(query_key, memory_key, memory_value, **kwargs):
        calls.append({**kwargs, "keys": list(memory_key), "values": list(memory_value)})
        return memory_read(query_key, memory_key, memory_value, **kwargs)
    monkeypatch.setattr(integration, "memory_read", recording)
    return calls


def assert_same_segmentation(results, expected, atol=1e-5, decided=0.98):
    """Per step: the label map (segment_video's argmax) and the probabilities within atol of
    STCN's.

    The labels are compared wherever STCN's two most probable labels differ by more than
    2 atol, and those pixels must be at least the share `decided` of the frame: elsewhere the
    label is decided below the precision asked of the probabilities (two correct float32
    reads, or STCN's on two devices, may round it either way), so an exact match there is
    luck, not a contract."""
    assert len(results) == len(expected)
    for step, (result, reference) in enumerate(zip(results, expected, strict=True)):
        assert result.shape == reference.shape and result.dtype == reference.dtype
        top_two = reference.topk(2, dim=0).values
        clear = top_two[0] - top_two[1] > 2 * atol
        assert clear.float().mean() >= decided, f"step {step}: an ill-conditioned test input"
        assert torch.equal(result.argmax(0)[clear], reference.argmax(0)[clear]), \
            f"step {step}: the label maps differ"
        torch.testing.assert_close(result, reference, rtol=0, atol=atol, msg=f"step {step}")


def assert_original(processor):
    """processor and its bank run STCN's own methods, and nothing of the patch is left."""
    assert "initialize" not in vars(processor)
    assert processor.initialize.__func__ is eval_network.STCNInference.initialize
    bank = processor.memory_bank
    assert type(bank) is MemoryBank
    assert bank.match_memory.__func__ is MemoryBank.match_memory
    assert integration._BACKEND not in vars(bank)


# --------------------------------------------------------------------------- the read


def random_bank(objects, dtype, top_k=TOP_K, temp_frames=3, seed=0):
    """A MemoryBank of 4 permanent and temp_frames temporary frames of 6 x 7 random keys and
    values (temp_frames 3 > its size 2: the last one overwrites the first in place)."""
    generator = torch.Generator().manual_seed(seed)
    bank = MemoryBank(objects, top_k=top_k, temp_memory_size=2)
    for t in range(4 + temp_frames):
        key = torch.randn(64, 6, 7, generator=generator, dtype=torch.float64)
        value = torch.randn(objects, 512, 6, 7, generator=generator, dtype=torch.float64)
        bank.add_memory(key.to(dtype), value.to(dtype), is_temp=t >= 4)
    return bank


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temp_frames", [0, 3])
def test_match_memory_equals_stcn_read(dtype, temp_frames, spy):
    """Several objects, a query batch of 3, top-k: STCN's readout, shape and dtype, from one
    memory_read with the temporary memory as a chunk of its own (not a concatenated copy)."""
    bank = random_bank(objects=3, dtype=dtype, temp_frames=temp_frames)
    query = torch.randn(3, 64, 6, 7, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = bank.match_memory(query)
    integration.use_fused_read(bank)
    result = bank.match_memory(query)
    assert result.shape == expected.shape == (3, 3, 512, 6, 7)
    assert result.dtype == expected.dtype
    torch.testing.assert_close(result, expected, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-5 if dtype == torch.float32 else 1e-12)
    memory = [bank.mem_k] + [bank.temp_k] * bank.has_temp_mem
    # the top-k matters on these inputs: STCN's softmax over all positions reads otherwise
    everything = MemoryBank(3, top_k=sum(key.shape[2] for key in memory))
    everything.__dict__.update({name: getattr(bank, name) for name in (
        "mem_k", "mem_v", "temp_k", "temp_v", "has_temp_mem")})
    assert (everything.match_memory(query) - expected).abs().max() > 1e-2
    call = spy[0]
    assert (call["similarity"], call["top_k"]) == ("l2", TOP_K)
    assert call["scale"] == 1 / math.sqrt(64)
    assert [key.data_ptr() for key in call["keys"]] == [key.data_ptr() for key in memory]
    integration.use_original_read(bank)
    assert type(bank) is MemoryBank and integration._BACKEND not in vars(bank)


def test_tied_keys_read_the_lower_position():
    """A frame stored twice (segment_video's passes do) ties exactly at the top-k boundary: the
    fused read takes the permanent memory's twin, the lower position, as memory_read breaks
    ties; STCN's torch.topk may take either (the twins' values differ)."""
    generator = torch.Generator().manual_seed(2)
    key = torch.randn(64, 6, 7, generator=generator)
    bank = MemoryBank(2, top_k=3)
    bank.add_memory(key, torch.randn(2, 512, 6, 7, generator=generator))
    bank.add_memory(key, torch.randn(2, 512, 6, 7, generator=generator), is_temp=True)
    query = torch.randn(1, 64, 6, 7, generator=generator)
    result = integration.use_fused_read(bank).match_memory(query)

    keys = torch.cat([bank.mem_k, bank.temp_k], 2)[0]  # (CK, N): each key twice
    values = torch.cat([bank.mem_v, bank.temp_v], 2)  # (objects, CV, N)
    scores = (2 * keys.T @ query.flatten(2)[0] - keys.pow(2).sum(0)[:, None]) / 8  # (N, HW)

    def read(order):  # the softmax over the first 3 positions of each query's order
        top = order[:3]
        weights = torch.softmax(scores.gather(0, top), 0)
        return (values[:, :, top] * weights).sum(2).view(2, 1, 512, 6, 7)
    lower_first = scores.sort(dim=0, descending=True, stable=True).indices
    higher_first = (lower_first + 42) % 84  # every twin swapped
    torch.testing.assert_close(result, read(lower_first), rtol=1e-5, atol=1e-5)
    assert (read(higher_first) - read(lower_first)).abs().max() > 1e-2


def test_memory_smaller_than_top_k_reads_every_position():
    """Where STCN's torch.topk raises (fewer memory positions than top_k), the fused read is
    STCN's read with top_k the memory's size: the softmax over every position."""
    bank = random_bank(objects=2, dtype=torch.float32, temp_frames=0)  # 4 frames of 42
    query = torch.randn(1, 64, 6, 7, generator=torch.Generator().manual_seed(1))
    bank.top_k = 4 * 42 + 1
    with pytest.raises(RuntimeError, match="out of range"):
        bank.match_memory(query)
    bank.top_k = 4 * 42
    expected = bank.match_memory(query)
    bank.top_k = 4 * 42 + 1
    result = integration.use_fused_read(bank).match_memory(query)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_match_memory_keeps_stcn_dtype_under_autocast():
    """Under CPU autocast STCN's einsums read in bfloat16: the fused read casts its inputs as
    they do (as SDPA does), so its readout has that dtype too, and its error against the
    float32 read is no larger than that of STCN's own bfloat16 read (top-k may pick other
    positions from rounded affinities, in both)."""
    bank = random_bank(objects=2, dtype=torch.float32)
    query = torch.randn(1, 64, 6, 7, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = bank.match_memory(query)
        integration.use_fused_read(bank)
        result = bank.match_memory(query)
    assert expected.dtype == result.dtype == torch.bfloat16
    exact = integration.use_original_read(bank).match_memory(query)
    ours, theirs = ((x.float() - exact).abs() for x in (result, expected))
    assert ours.mean() <= 1.1 * theirs.mean() and ours.max() <= 1.1 * theirs.max()
    assert ours.mean() < 5e-3  # bfloat16's rounding, not a wrong read


def test_large_top_k_reads_with_torch_under_auto(spy):
    """A top_k above what the Triton kernels support still reads with backend="auto"."""
    bank = integration.use_fused_read(random_bank(objects=1, dtype=torch.float32, top_k=80))
    bank.match_memory(torch.randn(1, 64, 6, 7))
    integration.use_fused_read(bank, backend="naive")
    bank.match_memory(torch.randn(1, 64, 6, 7))
    assert [(call["top_k"], call["backend"]) for call in spy] == [(80, "torch"), (80, "naive")]


def cuda_bank(bank):
    """bank with its memory on the GPU."""
    for name in ("mem_k", "mem_v", "temp_k", "temp_v"):
        setattr(bank, name, getattr(bank, name).cuda())
    return bank


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_match_memory_on_gpu(dtype):
    """On CUDA (the Triton read), float32, and float16 under autocast as segment_video runs:
    STCN's dtype, and no further from a float64 read of the same inputs than the tolerance
    of the dtype, nor than STCN's own read (whose affinity autocast rounds to float16)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    bank = cuda_bank(random_bank(objects=3, dtype=dtype))
    query = torch.randn(2, 64, 6, 7, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    exact = MemoryBank(3, top_k=TOP_K)
    exact.__dict__.update({name: getattr(bank, name).double() for name in (
        "mem_k", "mem_v", "temp_k", "temp_v")}, has_temp_mem=True)
    expected = exact.match_memory(query.double())
    with torch.autocast("cuda", enabled=dtype == torch.float16):
        stcn = bank.match_memory(query)
        result = integration.use_fused_read(bank).match_memory(query)
    assert result.dtype == stcn.dtype == dtype and result.shape == stcn.shape
    error, stcn_error = relative_error(result, expected), relative_error(stcn, expected)
    assert error < TOLERANCE[dtype] and error <= stcn_error * 1.01, (error, stcn_error)


# --------------------------------------------------------------------------- the video


def test_video_matches_stcn_and_fused_read_restores(network, video, reference, spy):
    """Inside `with fused_read(processor)` the video's masks and probabilities are STCN's,
    with one memory_read per frame; on exit the processor and the bank it created inside run
    STCN's own methods, and a run then is bitwise the run with STCN's read."""
    processor = new_processor(network)
    with integration.fused_read(processor):
        fused = segment(processor, video)
        assert type(processor.memory_bank) is not MemoryBank
    assert len(spy) == len(fused) == len(FRAMES) - 1
    assert_same_segmentation(fused, reference)
    assert_original(processor)
    calls = len(spy)
    after = segment(processor, video, steps=2)
    assert len(spy) == calls
    assert all(torch.equal(a, b) for a, b in zip(after, reference[:2], strict=True))
    with pytest.raises(KeyError), integration.fused_read(processor):
        raise KeyError("inside")
    assert_original(processor)


def test_scripted_video_matches_stcn(network, video, reference, spy):
    """process_video's way: use_fused_read before initialize, torch.jit.script after it; the
    scripted model reads fused (the ignored fused read called back from TorchScript)."""
    processor = integration.use_fused_read(new_processor(network))
    fused = segment(processor, video, script=True)
    assert len(spy) == len(fused)
    assert_same_segmentation(fused, reference)
    integration.use_original_read(processor)
    assert_original(processor)


def test_nested_fused_read_restores_the_enclosing_read(network, video, spy):
    """A block inside a fused processor restores the enclosing backend on exit, also for the
    bank initialize created inside the block; use_original_read then restores STCN's."""
    processor = integration.use_fused_read(new_processor(network), backend="naive")
    with integration.fused_read(processor, backend="torch"):
        segment(processor, video, steps=1)
    bank = processor.memory_bank
    assert type(bank) is not MemoryBank and getattr(bank, integration._BACKEND) == "naive"
    segment(processor, video, steps=1)
    assert [call["backend"] for call in spy] == ["torch", "naive"]
    integration.use_original_read(processor)
    assert_original(processor)


@pytest.mark.gpu
def test_scripted_video_on_gpu_under_autocast(network, video, spy):
    """process_video's setting: CUDA, autocast, torch.jit.script, the Triton read. STCN's read
    rounds its affinity to float16 there, so the two agree to float16's precision (2e-3);
    the random network's objects are closer than that over much of the synthetic frames, so
    no share of labels decided at that precision is required."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gpu = copy.deepcopy(network).cuda()
    expected = segment(new_processor(gpu), video, script=True, device="cuda")
    fused = segment(integration.use_fused_read(new_processor(gpu)), video, script=True,
                    device="cuda")
    assert len(spy) == len(fused)
    assert_same_segmentation(fused, expected, atol=2e-3, decided=0.0)


# --------------------------------------------------------------------------- guards


def test_unknown_stcnbuf_is_refused(monkeypatch):
    """A function whose fingerprint is not a known version's: RuntimeError naming the
    installed and known versions and the function, and nothing patched."""
    import importlib.metadata
    installed = importlib.metadata.version("stcnbuf")
    monkeypatch.setitem(integration._KNOWN_FINGERPRINTS, "0.2.2", {
        **integration._KNOWN_FINGERPRINTS["0.2.2"], "softmax_w_top": "0" * 16})
    bank = random_bank(objects=1, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=f"installed stcnbuf is {installed} and its "
                                           "softmax_w_top differ from 0.2.2"):
        integration.use_fused_read(bank)
    assert type(bank) is MemoryBank and integration._BACKEND not in vars(bank)


def test_subclass_overriding_the_read_is_refused():
    class Custom(MemoryBank):
        def _global_matching(self, mk, qk):
            return super()._global_matching(mk, qk)
    with pytest.raises(RuntimeError, match="MemoryBank._global_matching"):
        integration.use_fused_read(Custom(1))


def test_bad_targets_and_backend(network):
    with pytest.raises(TypeError, match="STCNInference or MemoryBank; got Linear"):
        integration.use_fused_read(torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="backend must be one of"):
        integration.use_fused_read(MemoryBank(1), backend="cuda")
    processor = new_processor(network)
    processor.initialize = lambda frame, mask: None
    with pytest.raises(ValueError, match="initialize is already replaced"):
        integration.use_fused_read(processor)
    bank = integration.use_fused_read(random_bank(objects=1, dtype=torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(bank)
    with pytest.raises(TypeError, match="before torch.jit.script"):
        integration.use_fused_read(scripted)


def test_missing_stcnbuf_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "stcnbuf.inference_memory_bank", None)
    with pytest.raises(ImportError, match=r'pip install "/path/to/stm-kernels\[stcn\]" '
                                          r'.*pip install "stcnbuf==0\.2\.2"'):
        integration.use_fused_read(object())


def test_importing_stm_kernels_does_not_import_stcnbuf():
    code = ("import sys, stm_kernels, stm_kernels.integrations.stcn; "
            "stm_kernels.memory_read; assert 'stcnbuf' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
