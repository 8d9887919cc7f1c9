"""The ONNX export (stm_model.export) and its runner (stm_model.deploy): every graph against
its torch module, the read graphs against a float64 reference, the runner against the torch
segmenter (schedule, later objects, resume, reverse, masks on a real DAVIS clip), the runner
with torch absent, and the folder's checks."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import SHARED, synthetic_video
from reference import reference_read

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from stm_kernels import memory_read  # noqa: E402
from stm_model import STM, STMConfig, load_checkpoint  # noqa: E402
from stm_model.deploy import OnnxSegmenter  # noqa: E402
from stm_model.deploy import arrays  # noqa: E402
from stm_model.deploy.manifest import (GRAPHS, MANIFEST, ExportFolderError,  # noqa: E402
                                       graph_file, read_manifest)
from stm_model.export import ExportError, model_graphs, read_graphs, to_onnx  # noqa: E402
from stm_model.inference.video_segmenter import VideoSegmenter  # noqa: E402

DAVIS = SHARED / "data" / "davis2016-val"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(model, folder) of small-real exported once for the module."""
    folder = tmp_path_factory.mktemp("onnx") / "small-real"
    to_onnx("small-real", folder)
    return load_checkpoint("small-real").float().eval(), folder


def _session(folder, name):
    return ort.InferenceSession(str(folder / graph_file(name)),
                                providers=["CPUExecutionProvider"])


def _relative(actual, expected):
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() /
                 np.abs(expected).max())


def test_the_manifest_names_every_graph_with_its_opset_and_each_passes_the_checker(export):
    _, folder = export
    manifest = read_manifest(folder)
    assert set(manifest["graphs"]) == set(GRAPHS)
    assert manifest["key_dim"] == 64 and manifest["internal_size"] == 240
    for name, graph in manifest["graphs"].items():
        model = onnx.load(folder / graph["file"])
        onnx.checker.check_model(model, full_check=True)
        assert graph["opset"] == next(o.version for o in model.opset_import if o.domain == "")
        assert [i.name for i in model.graph.input] == graph["inputs"]
        assert [o.name for o in model.graph.output] == graph["outputs"]
        assert not any(n.domain not in ("", "ai.onnx") for n in model.graph.node), name
    assert manifest["graphs"]["read"]["opset"] == 23
    ops = {n.op_type for n in onnx.load(folder / "read.onnx").graph.node}
    assert "Attention" in ops and "Softmax" not in ops
    # a dynamic frame size and object count, named
    frame = onnx.load(folder / "memory_encoder.onnx").graph.input[1].type.tensor_type.shape
    assert [d.dim_param or d.dim_value for d in frame.dim][0] != 2


def _real_frame():
    """(frame (1, 3, 240, 432), its object (1, 240, 432)) of blackswan, or None without
    ../shared."""
    from PIL import Image
    image = DAVIS / "JPEGImages" / "480p" / "blackswan" / "00010.jpg"
    if not image.is_file():
        pytest.skip("needs ../shared/data/davis2016-val")
    frame = np.asarray(Image.open(image).convert("RGB").resize((432, 240)), np.float32) / 255
    mask = np.array(Image.open(DAVIS / "Annotations" / "480p" / "blackswan" / "00010.png")
                    .resize((432, 240), Image.NEAREST)) > 0
    return (torch.from_numpy(frame.transpose(2, 0, 1).copy())[None],
            torch.from_numpy(mask.astype(np.float32))[None])


@pytest.mark.parametrize("size, objects", [((240, 432), 3), ((112, 64), 1), ("real", 1)])
def test_every_model_graph_equals_its_torch_module(export, size, objects):
    """Random frames and soft masks of two sizes, and a real DAVIS frame with its object."""
    model, folder = export
    generator = torch.Generator().manual_seed(objects)
    if size == "real":
        frame, probs = _real_frame()
    else:
        frame = torch.rand((1, 3) + size, generator=generator)
        probs = torch.rand((objects,) + size, generator=generator)
    with torch.no_grad():
        query = model.encode_query(frame)
        keys, values = model.encode_memory(frame, probs)
        readout = torch.randn((objects, 256) + query.key.shape[2:], generator=generator) \
            if size != "real" else memory_read(query.key, keys.unsqueeze(2), values.unsqueeze(2))
        foreground = model.foreground(readout, query)
        aggregated = model_graphs.Aggregate()(foreground)
    cases = {"query_encoder": ((frame,), query.tensors()),
             "memory_encoder": ((frame, probs), (keys, values)),
             "decoder": ((readout, *query.tensors()[1:]), (foreground,)),
             "aggregate": ((foreground,), (aggregated,))}
    for name, (inputs, expected) in cases.items():
        outputs = _session(folder, name).run(None, dict(zip(
            GRAPHS[name][0], (x.numpy() for x in inputs), strict=True)))
        for output, reference in zip(outputs, expected, strict=True):
            assert output.shape == tuple(reference.shape), name
            assert _relative(output, reference) <= 1e-4, name


@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("objects, hw, n", [(1, 7, 33), (3, 40, 130)])
def test_the_read_graphs_equal_the_float64_read(similarity, objects, hw, n):
    rng = np.random.default_rng(hw)
    q = rng.standard_normal((1, 16, hw)).astype(np.float32)
    k = rng.standard_normal((objects, 16, n)).astype(np.float32)
    v = rng.standard_normal((objects, 24, n)).astype(np.float32)
    k_strided = np.asarray(k[:, :, ::-1])  # reversed memory: the same read
    expected = reference_read(*(torch.from_numpy(x) for x in (q, k, v)),
                              similarity=similarity)[0].numpy()  # float64, plain torch
    for name, build in read_graphs.READ_GRAPHS.items():
        session = ort.InferenceSession(build(16, 24, similarity).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        out = session.run(None, {"query_key": q, "memory_key": k, "memory_value": v})
        assert _relative(out[0], expected) <= 1e-5, name
        reversed_out = session.run(None, {"query_key": q, "memory_key": k_strided,
                                          "memory_value": np.asarray(v[:, :, ::-1])})
        assert _relative(reversed_out[0], expected) <= 1e-5, name
    # chunks of 10 positions merged exactly
    chunk = ort.InferenceSession(read_graphs.read_chunk(16, 24, similarity).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    readout = lse = None
    for start in range(0, n, 10):
        readout, lse = arrays.merge_chunks(readout, lse, *chunk.run(None, {
            "query_key": q, "memory_key": k[:, :, start:start + 10],
            "memory_value": v[:, :, start:start + 10]}))
    assert _relative(readout, expected) <= 1e-5
    scores = np.einsum("ck,bcn->bkn", q[0].astype(np.float64), k.astype(np.float64))
    if similarity == "l2":
        scores = 2 * scores - (k.astype(np.float64) ** 2).sum(1)[:, None]
    scores /= np.sqrt(16)
    top = scores.max(-1)
    expected_lse = top + np.log(np.exp(scores - top[..., None]).sum(-1))
    assert np.abs(lse - expected_lse).max() <= 1e-4


def _video(frames=9, size=(64, 80)):
    images, labels = synthetic_video(frames, size=size, objects=2)
    return np.asarray(images, np.float32), np.asarray(labels).astype(np.int64)


def _torch_run(model, images, masks, **options):
    seg = VideoSegmenter(model, memory_dtype="fp32", **options)
    return [seg.step(torch.from_numpy(image), None if masks.get(t) is None else
                     torch.from_numpy(masks[t])).numpy() for t, image in enumerate(images)]


@pytest.mark.parametrize("read", ["chunk", "whole"])
def test_the_runner_gives_the_torch_segmenters_probabilities(export, read):
    """Object 2 enters on frame 3; memory every 2nd frame; a chunk of 2 frames; frames
    larger than the model's internal size (resized, with a mask merged at the input size)."""
    model, folder = export
    images, labels = _video(frames=9, size=(64, 80))
    first = np.where(labels[0] == 2, 0, labels[0])
    masks = {0: first, 3: np.where(labels[3] == 2, 2, 0)}
    for size in (None, 48):
        expected = _torch_run(model, images, masks, mem_every=2, max_internal_size=size)
        seg = OnnxSegmenter(folder, mem_every=2, read=read, chunk_frames=2,
                            max_internal_size=size)
        got = [seg.step(image, masks.get(t)) for t, image in enumerate(images)]
        assert seg.object_ids == [1, 2] and seg.memory_frames == 6
        for t, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4, (size, t)


def test_the_runner_resumes_and_runs_backwards_as_the_torch_segmenter(export):
    model, folder = export
    images, labels = _video(frames=7)
    torch_seg = VideoSegmenter(model, memory_dtype="fp32", start_frame=6, reverse=True)
    onnx_seg = OnnxSegmenter(folder, start_frame=6, reverse=True)
    for t in range(6, 2, -1):  # backwards from frame 6
        mask = labels[6] if t == 6 else None
        a = onnx_seg.step(images[t], mask)
        b = torch_seg.step(torch.from_numpy(images[t]), None if mask is None else
                           torch.from_numpy(mask)).numpy()
        assert np.abs(a - b).max() <= 1e-4
    # resume: frames 0..2 replayed from their labels, frame 3 on segmented
    torch_seg = VideoSegmenter(model, memory_dtype="fp32")
    onnx_seg = OnnxSegmenter(folder)
    for t in range(3):
        a = onnx_seg.replay(images[t], labels[t], annotated=t == 0)
        b = torch_seg.replay(torch.from_numpy(images[t]), torch.from_numpy(labels[t]),
                             annotated=t == 0).numpy()
        assert np.array_equal(a, b)
    for t in range(3, 7):
        a, b = onnx_seg.step(images[t]), torch_seg.step(torch.from_numpy(images[t])).numpy()
        assert np.abs(a - b).max() <= 1e-4
        assert np.array_equal(onnx_seg.labels(a), torch_seg.labels(torch.from_numpy(b)))
    with pytest.raises(ValueError, match="not objects of this video"):
        OnnxSegmenter(folder).replay(images[0], labels[0] * 0 + 5, annotated=False)


def test_the_runner_refuses_bad_input_naming_it(export, tmp_path):
    _, folder = export
    images, labels = _video(frames=2)
    seg = OnnxSegmenter(folder)
    with pytest.raises(ValueError, match="first frame needs a mask"):
        seg.step(images[0])
    with pytest.raises(ValueError, match=r"frame must be a \(3, H, W\)"):
        seg.step(images[0][0], labels[0])
    with pytest.raises(ValueError, match="mask is 40x30"):
        seg.step(images[0], np.zeros((30, 40), np.int64))
    with pytest.raises(ValueError, match="read must be one of chunk, whole"):
        OnnxSegmenter(folder, read="all")
    with pytest.raises(ExportFolderError, match="stm export MODEL"):
        OnnxSegmenter(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text((folder / MANIFEST).read_text())
    with pytest.raises(ExportFolderError, match="lacks query_encoder.onnx"):
        OnnxSegmenter(broken)


def _copy(folder, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def _manifest_with(folder, change):
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _graph_body_garbled(path):
    """path rewritten as a model with its own opset_import but a graph field of junk bytes:
    past the header, only onnxruntime can tell."""
    from stm_model.deploy.manifest import graph_opsets
    (domain, version), = graph_opsets(path).items()
    opset = bytes([0x0A, len(domain)]) + domain.encode() + bytes([0x10, version])
    junk = bytes(range(7, 120))  # shorter than 128: one-byte lengths
    path.write_bytes(bytes([0x42, len(opset)]) + opset + bytes([0x3A, len(junk)]) + junk)


# (what is wrong, how the copy is broken, the message's pattern)
BROKEN_FOLDERS = [
    ("truncated graph", lambda f: (f / "query_encoder.onnx").write_bytes(
        (f / "query_encoder.onnx").read_bytes()[:5000]), r"query_encoder\.onnx is not an ONNX"),
    ("junk graph", lambda f: (f / "decoder.onnx").write_bytes(b"not a model at all\n" * 9),
     r"decoder\.onnx is not an ONNX"),
    ("garbled graph body", lambda f: _graph_body_garbled(f / "aggregate.onnx"),
     r"onnxruntime cannot load \S*aggregate\.onnx"),
    ("manifest not JSON", lambda f: (f / MANIFEST).write_text("{not json"),
     r"stm_onnx\.json is not JSON"),
    ("manifest without key_dim", lambda f: _manifest_with(f, lambda m: m.pop("key_dim")),
     r"stm_onnx\.json is malformed: key_dim must be a positive integer; got missing"),
    ("manifest's graphs a list", lambda f: _manifest_with(
        f, lambda m: m.update(graphs=[])), r"stm_onnx\.json is malformed: graphs must be"),
    ("key size contradicted", lambda f: _manifest_with(f, lambda m: m.update(key_dim=32)),
     r"query_encoder\.onnx: key has 64 channels but the manifest's key_dim is 32"),
    ("value size contradicted", lambda f: _manifest_with(f, lambda m: m.update(value_dim=512)),
     r"query_encoder\.onnx: value has 256 channels but the manifest's value_dim is 512"),
    ("opset contradicted", lambda f: _manifest_with(
        f, lambda m: m["graphs"]["decoder"].update(opset=17)),
     r"decoder\.onnx is of opset 18 but \S*stm_onnx\.json says 17"),
    ("format version contradicted", lambda f: _manifest_with(
        f, lambda m: m.update(format_version=99)), r"is format version 99"),
    ("outputs contradicted", lambda f: _manifest_with(
        f, lambda m: m["graphs"]["read_chunk"].update(outputs=["readout"])),
     r"read_chunk\.onnx has the outputs \['readout', 'lse'\], but the manifest lists"),
]


@pytest.mark.parametrize("what, break_, message", BROKEN_FOLDERS,
                         ids=[what for what, _, _ in BROKEN_FOLDERS])
def test_a_broken_export_folder_is_refused_in_one_line_naming_the_file(export, tmp_path, what,
                                                                        break_, message):
    _, folder = export
    copy = _copy(folder, tmp_path)
    break_(copy)
    with pytest.raises(ExportFolderError, match=message):
        OnnxSegmenter(copy)
    images, labels = _video(frames=2)
    frames = tmp_path / "frames"
    frames.mkdir()
    from PIL import Image
    for t, image in enumerate(images):
        Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(
            frames / f"{t:05d}.png")
    Image.fromarray(labels[0].astype(np.uint8)).save(tmp_path / "mask.png")
    result = subprocess.run([sys.executable, "-m", "stm_model", "segment", str(frames),
                             "--mask", str(tmp_path / "mask.png"), "--runtime", "onnxruntime",
                             "--checkpoint", str(copy), "--output", str(tmp_path / "out"),
                             "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("stm segment: error: ")


def test_the_opset_reader_agrees_with_onnx(export):
    from stm_model.deploy.manifest import graph_opsets
    _, folder = export
    for name in GRAPHS:
        model = onnx.load(folder / graph_file(name), load_external_data=False)
        assert graph_opsets(folder / graph_file(name)) == {
            entry.domain: entry.version for entry in model.opset_import}


# A runner in a process where importing torch fails: the masks it writes are compared with
# the parent's torch run.
_NO_TORCH = """
import sys, json
import numpy as np
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
from stm_model.deploy import OnnxSegmenter
data = np.load(sys.argv[2])
seg = OnnxSegmenter(sys.argv[1], mem_every=2)
probs = [seg.step(image, data["mask"] if t == 0 else None)
         for t, image in enumerate(data["images"])]
np.save(sys.argv[3], np.stack(probs))
heavy = ("torch", "onnx", "onnxscript")
print(json.dumps(sorted(m for m in sys.modules
                        if m.split(".")[0] in heavy and sys.modules[m] is not None)))
"""


def test_the_runner_runs_with_torch_absent(export, tmp_path):
    model, folder = export
    images, labels = _video(frames=5)
    np.savez(tmp_path / "inputs.npz", images=images, mask=labels[0])
    result = subprocess.run([sys.executable, "-c", _NO_TORCH, str(folder),
                             str(tmp_path / "inputs.npz"), str(tmp_path / "probs.npy")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []  # no torch, no onnx
    expected = _torch_run(model, images, {0: labels[0]}, mem_every=2)
    assert np.abs(np.load(tmp_path / "probs.npy") - np.stack(expected)).max() <= 1e-4


@pytest.mark.skipif(not DAVIS.is_dir(), reason="needs ../shared/data/davis2016-val")
def test_masks_on_a_real_davis_clip_score_the_torch_runs_j_and_f(export):
    from PIL import Image

    from stm_model.metrics import evaluate_sequence
    model, folder = export
    frames = sorted((DAVIS / "JPEGImages" / "480p" / "blackswan").glob("*.jpg"))[:25]
    truth = np.stack([np.array(Image.open(DAVIS / "Annotations" / "480p" / "blackswan" /
                                          f"{path.stem}.png")) > 0 for path in frames])
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32).transpose(2, 0, 1)
                       / 255 for p in frames])
    masks = {0: truth[0].astype(np.int64)}
    torch_probs = _torch_run(model, images, masks)
    seg = OnnxSegmenter(folder)
    onnx_probs = [seg.step(image, masks.get(t)) for t, image in enumerate(images)]
    for a, b in zip(onnx_probs, torch_probs, strict=True):  # through every graph, real frames
        assert np.abs(a - b).max() <= 1e-3
    labels = {name: np.stack([p.argmax(0) for p in probs])
              for name, probs in (("torch", torch_probs), ("onnx", onnx_probs))}
    scores = {name: evaluate_sequence(truth[1:].astype(np.int64), value[1:])
              for name, value in labels.items()}
    jf = {name: float(s["J"].mean() + s["F"].mean()) / 2 for name, s in scores.items()}
    assert jf["torch"] > 0.7  # the model segments the clip at all
    assert abs(jf["onnx"] - jf["torch"]) <= 0.002, jf


@pytest.mark.parametrize("name", ["small", "small-interactive", "small-real-interactive",
                                  "official"])
def test_every_shipped_model_and_the_official_architecture_export(name, tmp_path):
    """official: its architecture (ResNet-50) with random weights (no download here)."""
    model = STM(STMConfig()).eval() if name == "official" else name
    manifest = to_onnx(model, tmp_path / name, source=name)
    assert manifest["interactive"] == name.endswith("interactive")
    seg = OnnxSegmenter(tmp_path / name)
    images, labels = _video(frames=3, size=(48, 64))
    probs = [seg.step(image, labels[0] if t == 0 else None) for t, image in enumerate(images)]
    assert probs[-1].shape == (3, 48, 64) and np.allclose(probs[-1].sum(0), 1, atol=1e-5)


def test_what_cannot_be_exported_is_one_line_and_leaves_no_folder(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported: data-dependent operator\n" + "detail\n" * 50)
    monkeypatch.setattr(torch.onnx, "export", refuse)
    model = STM(STMConfig.small()).eval()
    with pytest.raises(ExportError) as error:
        to_onnx(model, tmp_path / "out")
    assert "\n" not in str(error.value) and "query_encoder" in str(error.value)
    assert "data-dependent" in str(error.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging folder left
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ExportError, match=r"pip install '/path/to/stm-kernels\[deploy\]'"):
        to_onnx(model, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    monkeypatch.delitem(sys.modules, "onnxscript")
    with pytest.raises(ExportError, match="not an ONNX export"):
        to_onnx(model, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_the_array_twins_equal_the_torch_resizes():
    from stm_model.inference.resize import downsample_probs, resize_frame, upsample_probs
    rng = np.random.default_rng(0)
    frame = rng.random((3, 97, 130), dtype=np.float32)
    for size in ((48, 64), (200, 255)):
        assert np.abs(arrays.resize_bilinear(frame, size) -
                      resize_frame(torch.from_numpy(frame), size).numpy()).max() <= 1e-4
        assert np.abs(arrays.resize_bilinear(frame, size) -
                      upsample_probs(torch.from_numpy(frame), size).numpy()).max() <= 1e-4 \
            or size[0] < 97  # shrinking: antialiased, unlike upsample_probs
    for size in ((48, 64), (31, 47)):
        assert np.abs(arrays.downsample_area(frame, size) -
                      downsample_probs(torch.from_numpy(frame), size).numpy()).max() <= 1e-5
