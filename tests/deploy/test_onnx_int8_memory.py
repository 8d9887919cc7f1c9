"""An ONNX export for an int8 memory (to_onnx(..., memory_dtype="int8")): the read graphs
against the float64 read of the dequantised memory, the runner's quantisation against the
torch bank's, the runner against the torch segmenter with an int8 memory (a small clip, and
J&F on a real DAVIS training sequence), and the refusals of an export for another memory."""
import json
import shutil

import numpy as np
import pytest
import torch

from helpers import SHARED, synthetic_video
from reference import reference_read

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from stm_kernels import QuantizedMemory  # noqa: E402
from stm_model import load_checkpoint  # noqa: E402
from stm_model.deploy import OnnxSegmenter, arrays  # noqa: E402
from stm_model.deploy.manifest import (GRAPHS, MANIFEST, ExportFolderError,  # noqa: E402
                                       graph_file, read_manifest)
from stm_model.export import read_graphs, to_onnx  # noqa: E402
from stm_model.inference.video_segmenter import VideoSegmenter  # noqa: E402

DAVIS = SHARED / "data" / "davis2016-val"
# a DAVIS-2016 training sequence (bench.davis_test.TRAINING_SEQUENCES), not a reserved one
REAL_SEQUENCE = "camel"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(model, folder) of small-real exported once for an int8 memory."""
    folder = tmp_path_factory.mktemp("onnx") / "small-real-int8"
    to_onnx("small-real", folder, memory_dtype="int8")
    return load_checkpoint("small-real").float().eval(), folder


def _relative(actual, expected):
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() /
                 np.abs(expected).max())


def _quantized_frames(rng, objects, key_dim, value_dim, frames, positions):
    """An int8 memory of `frames` frames as the runner stores it: per frame (keys int8, key
    scales (n, Ck, 1), values int8, value scales (n, 1, P)); keys with channels of magnitudes
    spread over 30x and frames of different magnitudes, so that a scale on the wrong axis or
    frame shows."""
    stored = []
    for t in range(frames):
        keys = rng.standard_normal((objects, key_dim, positions)) * \
            rng.uniform(0.1, 3.0, (objects, key_dim, 1)) * (t + 1)
        values = rng.standard_normal((objects, value_dim, positions)) * \
            rng.uniform(0.2, 2.0, (objects, 1, positions))
        stored.append(arrays.quantize_int8(keys.astype(np.float32), "channel") +
                      arrays.quantize_int8(values.astype(np.float32), "position"))
    return stored


def _graph_inputs(stored):
    """The read graphs' memory inputs of these frames: keys, values, key scales (n, Ck, T),
    value scales (n, 1, T·P)."""
    keys, key_scales, values, value_scales = zip(*stored, strict=True)
    return [np.concatenate(x, 2) for x in (keys, values, key_scales, value_scales)]


def _dequantized(stored):
    """The memory the frames stand for, (n, C, T·P) float64, in plain torch."""
    keys = torch.cat([torch.from_numpy(k).double() * torch.from_numpy(s).double()
                      for k, s, _, _ in stored], 2)
    values = torch.cat([torch.from_numpy(v).double() * torch.from_numpy(s).double()
                        for _, _, v, s in stored], 2)
    return keys, values


def _run(session, q, memory):
    return session.run(None, dict(zip(("query_key", "memory_key", "memory_value", "key_scale",
                                       "value_scale"), (q, *memory), strict=True)))


@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("objects, hw, frames, positions", [(1, 7, 5, 9), (3, 40, 4, 13)])
def test_the_int8_read_graphs_equal_the_float64_read_of_the_dequantised_memory(
        similarity, objects, hw, frames, positions):
    rng = np.random.default_rng(hw)
    q = rng.standard_normal((1, 16, hw)).astype(np.float32)
    stored = _quantized_frames(rng, objects, 16, 24, frames, positions)
    memory = _graph_inputs(stored)
    keys, values = _dequantized(stored)
    expected, expected_lse, _ = (x.numpy() for x in reference_read(
        torch.from_numpy(q).double(), keys, values, similarity=similarity))
    for name, build in read_graphs.READ_GRAPHS.items():
        graph = build(16, 24, similarity, "int8")
        assert "DequantizeLinear" in {node.op_type for node in graph.graph.node}, name
        assert graph.opset_import[0].version >= 13, name  # per-axis DequantizeLinear
        session = ort.InferenceSession(graph.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        assert [i.type for i in session.get_inputs()][1:3] == ["tensor(int8)"] * 2, name
        assert _relative(_run(session, q, memory)[0], expected) <= 1e-5, name
        # each frame's key scales apply to its own frame: swapped, the read is another
        swapped = list(memory)
        swapped[2] = memory[2][:, :, ::-1].copy()
        assert _relative(_run(session, q, swapped)[0], expected) > 1e-2, name
    # the chunk read two frames at a time, merged exactly, log-sum-exp included
    chunk = ort.InferenceSession(read_graphs.read_chunk(16, 24, similarity, "int8")
                                 .SerializeToString(), providers=["CPUExecutionProvider"])
    readout = lse = None
    for start in range(0, frames, 2):
        readout, lse = arrays.merge_chunks(readout, lse, *_run(
            chunk, q, _graph_inputs(stored[start:start + 2])))
    assert _relative(readout, expected) <= 1e-5
    assert lse.shape == expected_lse.shape and np.abs(lse - expected_lse).max() <= 1e-4


@pytest.mark.parametrize("axis", ["channel", "position"])
def test_the_runners_int8_quantisation_is_the_torch_banks_bit_for_bit(axis):
    """Ragged sizes, an all-zero row, elements halfway between two steps (ties to even)."""
    rng = np.random.default_rng(3)
    memory = (rng.standard_normal((3, 37, 53)) * rng.uniform(0.01, 5, (3, 37, 1))
              ).astype(np.float32)
    memory[1, 4] = 0.0  # an all-zero channel
    memory[2, :, 7] = 0.0  # an all-zero position
    memory[0, 0, :3] = [127.0, 0.5, -2.5]  # scale 1 on that channel: halves round to even
    memory[0, 0, 3:] = np.clip(memory[0, 0, 3:], -1, 1)
    data, scale = arrays.quantize_int8(memory, axis)
    reference = QuantizedMemory.quantize(torch.from_numpy(memory), "int8", axis=axis)
    assert data.dtype == np.int8 and scale.dtype == np.float32
    assert np.array_equal(data, reference.data.numpy())
    assert np.array_equal(scale, reference.scale.numpy())
    if axis == "channel":
        assert list(data[0, 0, :3]) == [127, 0, -2]
    bad = memory.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        arrays.quantize_int8(bad, axis)


def _video(frames=9, size=(64, 80)):
    images, labels = synthetic_video(frames, size=size, objects=2)
    return np.asarray(images, np.float32), np.asarray(labels).astype(np.int64)


def _torch_run(model, images, masks, memory_dtype, **options):
    seg = VideoSegmenter(model, memory_dtype=memory_dtype, **options)
    return [seg.step(torch.from_numpy(image), None if masks.get(t) is None else
                     torch.from_numpy(masks[t])).numpy() for t, image in enumerate(images)]


def _mean_iou(labels_a, labels_b):
    """The mean over frames and objects (ids > 0 in either) of the masks' IoU."""
    ious = []
    for a, b in zip(labels_a, labels_b, strict=True):
        for i in sorted(set(np.unique(a)) | set(np.unique(b)) - {0}):
            union = np.logical_or(a == i, b == i).sum()
            ious.append(np.logical_and(a == i, b == i).sum() / union)
    return float(np.mean(ious))


@pytest.mark.parametrize("read", ["chunk", "whole"])
def test_the_runner_with_an_int8_memory_segments_as_the_torch_segmenter_with_one(export,
                                                                                  read):
    """Object 2 enters on frame 3; memory every 2nd frame; chunks of 2 frames."""
    model, folder = export
    images, labels = _video()
    masks = {0: np.where(labels[0] == 2, 0, labels[0]), 3: np.where(labels[3] == 2, 2, 0)}
    expected = _torch_run(model, images, masks, "int8", mem_every=2)
    seg = OnnxSegmenter(folder, mem_every=2, read=read, chunk_frames=2)
    got = [seg.step(image, masks.get(t)) for t, image in enumerate(images)]
    assert seg.memory_dtype == "int8" and seg.object_ids == [1, 2]
    for bank in seg.banks:  # stored in 8 bits, with the torch bank's scales' shapes
        assert {k.dtype for k in bank.keys} == {v.dtype for v in bank.values} == {
            np.dtype(np.int8)}
        n, key_dim, positions = bank.keys[0].shape
        assert bank.key_scales[0].shape == (n, key_dim, 1)
        assert bank.value_scales[0].shape == (n, 1, positions)
    # an int8 frame and its scales: about a quarter of float32's bytes (Ck = 64, Cv = 256)
    frame_bytes = sum(x.nbytes for x in (bank.keys[0], bank.values[0], bank.key_scales[0],
                                         bank.value_scales[0]))
    assert frame_bytes <= 0.27 * 4 * (bank.keys[0].size + bank.values[0].size)
    # measured: 2.5e-4 (an encoder output a float32 rounding away moves its int8 step)
    assert max(np.abs(a - b).max() for a, b in zip(got, expected, strict=True)) <= 2e-3
    labels_of = [seg.labels(p) for p in got]
    torch_labels = [seg.labels(p) for p in expected]
    assert _mean_iou(labels_of, torch_labels) >= 0.99


def _fp32_copy(folder, tmp_path):
    """A copy of the int8 export with the float32 read graphs and a manifest from before
    memory_dtype (an earlier export's)."""
    copy = tmp_path / "fp32"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    for name, build in read_graphs.READ_GRAPHS.items():
        onnx.save(build(manifest["key_dim"], manifest["value_dim"], manifest["similarity"]),
                  copy / graph_file(name))
        manifest["graphs"][name]["inputs"] = list(GRAPHS[name][0])
    del manifest["memory_dtype"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


def test_a_runner_refuses_an_export_for_another_memory_dtype_naming_the_file(export,
                                                                            tmp_path):
    _, folder = export
    assert read_manifest(folder)["memory_dtype"] == "int8"
    with pytest.raises(ExportFolderError, match=r"stm_onnx\.json: this export's read graphs "
                                                r"take a int8 memory, not fp32"):
        OnnxSegmenter(folder, memory_dtype="fp32")
    fp32 = _fp32_copy(folder, tmp_path)
    seg = OnnxSegmenter(fp32)  # a manifest without memory_dtype: float32, as before
    assert seg.memory_dtype == "fp32"
    images, labels = _video(frames=3)
    seg.step(images[0], labels[0])
    seg.step(images[1])
    assert seg.banks[0].keys[0].dtype == np.float32 and not seg.banks[0].key_scales
    with pytest.raises(ExportFolderError, match=r"stm_onnx\.json: .* take a fp32 memory, not "
                                                "int8"):
        OnnxSegmenter(fp32, memory_dtype="int8")
    # a float32 read graph in the int8 export's folder
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    shutil.copy(fp32 / "read_chunk.onnx", mixed / "read_chunk.onnx")
    with pytest.raises(ExportFolderError, match=r"read_chunk\.onnx takes a float32 memory but "
                                                r"the manifest's memory_dtype is int8"):
        OnnxSegmenter(mixed)
    manifest = json.loads((mixed / MANIFEST).read_text())
    manifest["memory_dtype"] = "fp8"
    (mixed / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ExportFolderError, match=r"stm_onnx\.json is malformed: memory_dtype "
                                                "must be fp32 or int8; got 'fp8'"):
        OnnxSegmenter(mixed)
    with pytest.raises(ValueError, match="memory_dtype must be one of fp32, int8"):
        OnnxSegmenter(folder, memory_dtype="fp8")
    with pytest.raises(ValueError, match="memory_dtype must be one of fp32, int8"):
        to_onnx("small-real", tmp_path / "fp8", memory_dtype="fp8")
    assert not (tmp_path / "fp8").exists()


@pytest.mark.skipif(not DAVIS.is_dir(), reason="needs ../shared/data/davis2016-val")
def test_an_int8_memory_on_a_real_davis_sequence_scores_the_torch_runs_j_and_f(export):
    """25 frames of a DAVIS-2016 training sequence at 480p: the runner with an int8 memory
    against the torch segmenter with one (J&F within 0.005, masks' mean IoU >= 0.99) and
    with a float32 memory (J&F within 0.005)."""
    from PIL import Image

    from stm_model.metrics import evaluate_sequence
    model, folder = export
    frames = sorted((DAVIS / "JPEGImages" / "480p" / REAL_SEQUENCE).glob("*.jpg"))[:25]
    truth = np.stack([np.array(Image.open(DAVIS / "Annotations" / "480p" / REAL_SEQUENCE /
                                          f"{path.stem}.png")) > 0 for path in frames])
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32).transpose(2, 0, 1)
                       / 255 for p in frames])
    masks = {0: truth[0].astype(np.int64)}
    seg = OnnxSegmenter(folder)
    runs = {"onnx int8": [seg.step(image, masks.get(t)) for t, image in enumerate(images)],
            "torch int8": _torch_run(model, images, masks, "int8"),
            "torch fp32": _torch_run(model, images, masks, "fp32")}
    labels = {name: np.stack([p.argmax(0) for p in probs]) for name, probs in runs.items()}
    jf = {}
    for name, value in labels.items():
        scores = evaluate_sequence(truth[1:].astype(np.int64), value[1:])
        jf[name] = float(scores["J"].mean() + scores["F"].mean()) / 2
    assert jf["torch fp32"] > 0.7  # the model segments the sequence at all
    assert abs(jf["onnx int8"] - jf["torch int8"]) <= 0.005, jf
    assert abs(jf["onnx int8"] - jf["torch fp32"]) <= 0.005, jf
    assert _mean_iou(labels["onnx int8"][1:], labels["torch int8"][1:]) >= 0.99
