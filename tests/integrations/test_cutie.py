"""stm_kernels.integrations.cutie: a Cutie model reading memory with memory_read segments as
Cutie does, and gives the training read's gradients.

The model is Cutie-small (the packaged configs) with randomly initialised weights (the
ImageNet ResNet files its constructor loads are written, seeded, into a temporary folder):
nothing is downloaded. The clip is DAVIS-2016 bmx-trees with the two objects of its first
OSVOS label, downscaled to 96 px, from ../shared when present, a synthetic video otherwise.
The memory settings are lowered so that within the clip the working memory is consolidated
into long-term memory several times and long-term memory drops obsolete features. Torch runs
on one thread: on a shared 2-core machine its thread pool otherwise spins for most of the time.
"""
import contextlib
import dataclasses
import importlib.metadata
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("cutie")

from cutie.inference.inference_core import InferenceCore  # noqa: E402
from cutie.inference.memory_manager import MemoryManager  # noqa: E402
from cutie.model.cutie import CUTIE  # noqa: E402
from cutie.model.utils import resnet  # noqa: E402
from cutie.utils.tensor_utils import pad_divide_by  # noqa: E402

from bench.integrations import cutie_config  # noqa: E402
from helpers import SHARED, TOLERANCE, relative_error, synthetic_video  # noqa: E402
from stm_kernels.integrations import cutie as integration  # noqa: E402

FRAMES = 14
SHORT_SIDE = 96
# Per-pixel probabilities of the fused run stay this close to Cutie's (float32 rounding of
# differently ordered sums).
PROBABILITY_TOLERANCE = 1e-5
DAVIS = SHARED / "data" / "davis2016-val" / "JPEGImages" / "480p" / "bmx-trees"
LABEL = SHARED / "data" / "osvos-davis2017-val-predictions" / "bmx-trees" / "00000.png"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    """A folder holding a seeded random resnet18 under the name Cutie's load_url expects."""
    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    torch.save(resnet.resnet18(pretrained=False).state_dict(), folder / "resnet18-5c106cde.pth")
    return folder


def config(resnet_dir, **overrides):
    """Cutie's eval config with the small model (bench.integrations.cutie_config), long-term
    memory on and engaging within a few frames."""
    return cutie_config(resnet_dir, {
        "use_long_term": True, "mem_every": 2, "top_k": 30,
        # consolidate every memory frame from the 4th frame on, 32 prototypes at a time, and
        # drop obsolete long-term features from the third consolidation on
        "long_term": {"max_mem_frames": 3, "min_mem_frames": 2, "num_prototypes": 32,
                      "max_num_tokens": 96, "buffer_tokens": 16, "count_usage": True},
    }, overrides)


@pytest.fixture(scope="module")
def network(resnet_dir):
    torch.manual_seed(0)
    return CUTIE(config(resnet_dir)).eval()


@dataclasses.dataclass
class Clip:
    frames: list  # (3, H, W) float in [0, 1]
    mask: torch.Tensor  # (H, W) int64 object ids of the first frame
    objects: list


@pytest.fixture(scope="module")
def clip():
    if DAVIS.is_dir() and LABEL.is_file():
        from PIL import Image
        paths = sorted(DAVIS.glob("*.jpg"))[:FRAMES]
        width, height = Image.open(paths[0]).size
        size = (round(width * SHORT_SIDE / height), SHORT_SIDE)
        frames = [torch.from_numpy(np.array(Image.open(path).convert("RGB").resize(
            size, Image.BILINEAR))).permute(2, 0, 1).float() / 255 for path in paths]
        mask = torch.from_numpy(np.array(Image.open(LABEL).resize(size, Image.NEAREST))).long()
    else:
        images, labels = synthetic_video(FRAMES, size=(SHORT_SIDE, 160), seed=5, objects=2)
        frames, mask = list(images.float()), torch.from_numpy(labels[0]).long()
    assert mask.unique().tolist() == [0, 1, 2]
    return Clip(frames, mask, [1, 2])


@dataclasses.dataclass
class Run:
    probs: list
    masks: list
    long_term_sizes: list
    processor: InferenceCore


def run_clip(processor, clip, frames=None):
    """Cutie's evaluation loop over the clip: the first frame's mask, then segmentation."""
    probs, masks, sizes = [], [], []
    with torch.inference_mode():
        for index, frame in enumerate(clip.frames[:frames]):
            first = index == 0
            prob = processor.step(frame, clip.mask if first else None,
                                  clip.objects if first else None)
            probs.append(prob)
            masks.append(processor.output_prob_to_mask(prob))
            sizes.append(sum(processor.memory.long_mem.size(bucket)
                             for bucket in processor.memory.work_mem.buckets))
    return Run(probs, masks, sizes, processor)


@contextlib.contextmanager
def spying():
    """The keyword arguments of every memory_read call the integration makes in the block."""
    calls = []
    real = integration.memory_read

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(integration, "memory_read", spy)
        yield calls


@pytest.fixture(scope="module")
def topk_runs(network, resnet_dir, clip):
    """(Cutie's run, the fused run, the fused run's memory_read calls) with top-k 30."""
    cfg = config(resnet_dir)
    original = run_clip(InferenceCore(network, cfg), clip)
    with spying() as calls:
        fused = run_clip(integration.use_fused_read(InferenceCore(network, cfg)), clip)
    return original, fused, calls


@pytest.fixture(scope="module")
def full_softmax_runs(network, resnet_dir, clip):
    """The same without top-k, one object per chunk and flip augmentation (a batch of 2)."""
    cfg = config(resnet_dir, top_k=None, chunk_size=1, flip_aug=True)
    original = run_clip(InferenceCore(network, cfg), clip)
    with spying() as calls:
        fused = run_clip(integration.use_fused_read(InferenceCore(network, cfg)), clip)
    return original, fused, calls


def assert_same_segmentation(original, fused):
    """Probabilities within PROBABILITY_TOLERANCE on every frame, masks identical wherever
    Cutie's top-two probability margin exceeds twice that tolerance (there the two argmaxes
    must agree), and that is nearly every pixel. Random weights give nearly uniform
    probabilities, so a few pixels per frame are within float32 rounding of a tie, where
    either run's argmax is decided by rounding; scaling the logits up does not remove them
    (the rounding scales with the logits, and saturated probabilities tie exactly at
    Cutie's clamp)."""
    assert len(original.probs) == len(fused.probs) == FRAMES
    for index, (p, q, m, n) in enumerate(zip(original.probs, fused.probs, original.masks,
                                             fused.masks, strict=True)):
        difference = (p - q).abs().max().item()
        assert difference <= PROBABILITY_TOLERANCE, f"frame {index}: {difference:.2e}"
        top_two = p.topk(2, dim=0).values
        decided = top_two[0] - top_two[1] > 2 * PROBABILITY_TOLERANCE
        assert decided.float().mean() > 0.95, f"frame {index}: too many near-ties"
        assert torch.equal(m[decided], n[decided]), f"frame {index}"
    assert original.long_term_sizes == fused.long_term_sizes


def assert_same_usage(original, fused):
    """The working and long-term memories' usage counts, life counts and contents agree."""
    for name in ("work_mem", "long_mem"):
        a, b = (getattr(run.processor.memory, name) for run in (original, fused))
        assert a.use_cnt.keys() == b.use_cnt.keys() and a.use_cnt, name
        for bucket in a.use_cnt:
            assert a.use_cnt[bucket].abs().sum() > 0, f"{name}: no usage counted"
            torch.testing.assert_close(b.use_cnt[bucket], a.use_cnt[bucket], rtol=1e-5,
                                       atol=1e-5)
            torch.testing.assert_close(b.life_cnt[bucket], a.life_cnt[bucket], rtol=0, atol=0)
            torch.testing.assert_close(b.k[bucket], a.k[bucket], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- inference


def test_topk_read_segments_as_cutie(topk_runs):
    original, fused, _ = topk_runs
    assert original.processor.memory.long_mem.engaged()
    # consolidated several times, and obsolete long-term features dropped (the size falls
    # short of one more set of 32 prototypes)
    sizes = original.long_term_sizes
    steps = [b - a for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    assert sizes[-1] > 32 and steps.count(32) >= 2 and any(step not in (0, 32) for step in steps)
    assert_same_segmentation(original, fused)


def test_topk_read_counts_usage_as_cutie(topk_runs):
    original, fused, _ = topk_runs
    assert_same_usage(original, fused)


def test_fused_run_reads_with_memory_read(topk_runs):
    """One memory_read per segmented frame (one bucket, all objects in one chunk), with
    Cutie's similarity, top-k and usage."""
    _, _, calls = topk_runs
    assert len(calls) == FRAMES - 1
    for call in calls:
        assert call["similarity"] == "xmem" and call["top_k"] == 30 and call["return_usage"]


def test_full_softmax_chunked_flipped_read_segments_as_cutie(full_softmax_runs):
    original, fused, calls = full_softmax_runs
    assert original.processor.memory.long_mem.engaged()
    assert_same_segmentation(original, fused)
    assert_same_usage(original, fused)
    # one read per object chunk, the usage counted on the first only
    assert len(calls) == 2 * (FRAMES - 1)
    assert [call["return_usage"] for call in calls[:2]] == [True, False]
    assert all(call["top_k"] is None for call in calls)


def test_fused_read_restores_the_original_methods_on_exit(network, resnet_dir, clip,
                                                           topk_runs):
    """Also on an exception, also for a memory manager created inside the block; a run
    after the block is Cutie's run, bit for bit."""
    processor = InferenceCore(network, config(resnet_dir))
    first_memory = processor.memory
    with pytest.raises(KeyError), integration.fused_read(processor) as patched:
        assert patched is processor
        assert processor.memory.read.__func__ is not MemoryManager.read
        processor.clear_memory()
        assert processor.memory is not first_memory
        assert processor.memory.read.__func__ is not MemoryManager.read
        raise KeyError("inside")
    for memory in (first_memory, processor.memory):
        assert memory.read.__func__ is MemoryManager.read
        assert "read" not in vars(memory)
    assert processor.clear_memory.__func__ is InferenceCore.clear_memory
    assert "clear_memory" not in vars(processor)
    after = run_clip(processor, clip)
    original = topk_runs[0]
    assert all(torch.equal(a, b) for a, b in zip(after.probs, original.probs, strict=True))


def test_nested_fused_read_restores_the_enclosing_backend(network, resnet_dir, clip):
    cfg = config(resnet_dir)
    processor = integration.use_fused_read(InferenceCore(network, cfg), backend="torch")
    with integration.fused_read(processor, backend="naive"):
        processor.clear_memory()
    with spying() as calls:
        run_clip(processor, clip, frames=2)
        assert [call["backend"] for call in calls] == ["torch"]
        integration.use_original_read(processor)
        assert "read" not in vars(processor.memory) and "clear_memory" not in vars(processor)
        processor.clear_memory()
        run_clip(processor, clip, frames=2)
        assert len(calls) == 1


def test_manager_alone_and_other_instances(network, resnet_dir, clip):
    """use_fused_read on a MemoryManager patches that manager only."""
    cfg = config(resnet_dir)
    patched, other = InferenceCore(network, cfg), InferenceCore(network, cfg)
    integration.use_fused_read(patched.memory)
    assert "clear_memory" not in vars(patched)
    with spying() as calls:
        run_clip(other, clip, frames=3)
        assert calls == []
        run_clip(patched, clip, frames=3)
        assert len(calls) == 2


# --------------------------------------------------------------------------- training


def training_inputs(network, clip):
    """read_memory's arguments as the training wrapper builds them: 3 memory frames and a
    query frame of the clip, 2 objects, as leaf tensors requiring gradients."""
    images, _ = pad_divide_by(torch.stack(clip.frames[:4]), 16)
    masks, _ = pad_divide_by(torch.stack([(clip.mask == obj).float() for obj in clip.objects]),
                             16)
    masks = masks[None]
    with torch.no_grad():
        ms_feat, pix_feat = network.encode_image(images)
        keys, shrinkages, selections = network.transform_key(ms_feat[0])
        h, w = keys.shape[-2:]
        sensory = torch.zeros(1, 2, network.sensory_dim, h, w)
        values, summaries = [], []
        for t in range(3):
            value, _, summary, _ = network.encode_mask(
                images[t:t + 1], pix_feat[t:t + 1], sensory, masks)
            values.append(value)
            summaries.append(summary)
    inputs = {
        "query_key": keys[3:], "query_selection": selections[3:],
        "memory_key": keys[:3].permute(1, 0, 2, 3)[None],
        "memory_shrinkage": shrinkages[:3].permute(1, 0, 2, 3)[None],
        "msk_value": torch.stack(values, 3), "obj_memory": torch.stack(summaries, 2),
        "pix_feat": pix_feat[3:], "sensory": torch.randn(1, 2, network.sensory_dim, h, w),
        "last_mask": masks, "selector": torch.ones(1, 2, 1, 1),
    }
    return {name: tensor.detach().requires_grad_(name != "selector")
            for name, tensor in inputs.items()}


def read_memory_with_grads(network, inputs):
    """read_memory's readout, and the gradients of a fixed random projection of it and of the
    object transformer's logits w.r.t. every input and parameter."""
    network.zero_grad()
    inputs = {name: t.detach().requires_grad_(t.requires_grad) for name, t in inputs.items()}
    readout, aux = network.read_memory(**inputs)
    generator = torch.Generator().manual_seed(1)
    outputs = [readout, *aux["q_logits"]]  # q_logits: one per object transformer block
    loss = sum((t * torch.randn(t.shape, generator=generator)).sum() for t in outputs)
    loss.backward()
    grads = {name: t.grad for name, t in inputs.items() if t.grad is not None}
    grads.update({name: p.grad for name, p in network.named_parameters() if p.grad is not None})
    return readout.detach(), grads


@pytest.fixture
def training_network(network):
    """The network in training mode (the object transformer's auxiliary outputs, which
    read_memory returns, exist only there), back in evaluation mode afterwards."""
    network.train()
    yield network
    network.eval()
    network.zero_grad(set_to_none=True)


def test_training_read_gives_cutie_outputs_and_gradients(training_network, clip):
    network = training_network
    inputs = training_inputs(network, clip)
    expected, expected_grads = read_memory_with_grads(network, inputs)
    with spying() as calls, integration.fused_read(network):
        readout, grads = read_memory_with_grads(network, inputs)
    assert len(calls) == 1
    assert network.read_memory.__func__ is CUTIE.read_memory
    assert relative_error(readout, expected) < TOLERANCE[torch.float32]
    assert grads.keys() == expected_grads.keys()
    # all five inputs of the read, and the parameters of the layers after it
    assert {"query_key", "query_selection", "memory_key", "memory_shrinkage",
            "msk_value"} <= grads.keys()
    assert any(name.startswith("pixel_fuser.") for name in grads)
    for name, grad in grads.items():
        error = relative_error(grad, expected_grads[name])
        assert error < 3 * TOLERANCE[torch.float32], f"{name}: {error:.2e}"


# --------------------------------------------------------------------------- guards


def test_a_foreign_cutie_function_is_refused_naming_the_version(network, resnet_dir,
                                                                monkeypatch):
    processor = InferenceCore(network, config(resnet_dir))
    original_read = MemoryManager.read

    def read(self, *args):  # a changed read
        return original_read(self, *args)
    monkeypatch.setattr(MemoryManager, "read", read)
    installed = importlib.metadata.version("rf-cutie")
    with pytest.raises(RuntimeError, match=f"installed rf-cutie {installed} .*MemoryManager.read"):
        integration.use_fused_read(processor)
    assert "read" not in vars(processor.memory) and "clear_memory" not in vars(processor)

    import cutie.model.cutie
    monkeypatch.setattr(cutie.model.cutie, "get_affinity", lambda *args: None)
    with pytest.raises(RuntimeError, match="get_affinity"):
        integration.use_fused_read(network)
    assert "read_memory" not in vars(network)


def test_the_refusal_names_the_known_versions(network, monkeypatch):
    known = integration._KNOWN_FINGERPRINTS["1.0.1"]
    monkeypatch.setattr(integration, "_KNOWN_FINGERPRINTS",
                        {"0.9": {**known, "CUTIE.read_memory": "0" * 16}})
    with pytest.raises(RuntimeError, match=r"rf-cutie 0\.9; in the installed rf-cutie 1\.0\.1 .*"
                                           r"differ from 0\.9's: CUTIE.read_memory \("):
        integration.use_fused_read(network)


def test_bad_targets_and_backends(network, resnet_dir):
    with pytest.raises(TypeError, match="target must be a Cutie InferenceCore"):
        integration.use_fused_read(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        integration.use_fused_read(network, backend="cuda")
    processor = InferenceCore(network, config(resnet_dir))
    processor.memory.read = print  # someone else's patch
    with pytest.raises(ValueError, match="MemoryManager.read is already replaced"):
        integration.use_fused_read(processor)
    assert processor.memory.read is print and "clear_memory" not in vars(processor)


def test_without_cutie_the_error_says_what_to_install(network, monkeypatch):
    monkeypatch.setitem(sys.modules, "cutie.inference.inference_core", None)
    with pytest.raises(ImportError, match=r'pip install "/path/to/stm-kernels\[cutie\]" '
                                          r'.*pip install "rf-cutie==1\.0\.1"'):
        integration.use_fused_read(network)


def test_importing_stm_kernels_does_not_import_cutie():
    code = ("import sys, stm_kernels, stm_kernels.integrations.cutie; "
            "sys.exit('cutie' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
