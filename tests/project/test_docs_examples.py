"""Every example in README.md and docs/ runs, so the docs cannot drift from the code.

Python blocks run in one namespace holding the names the pages leave to the reader (a query,
a memory, frames, a model, ...) at tiny sizes. Shell blocks: each `stm ...` line is parsed by
the command's own parser, each `python -m MODULE` / `torchrun -m MODULE` names a module that
exists (and `stm_model.training.loop`'s options are parsed too), each `make TARGET` is a Makefile
target. Nothing is downloaded: STM_weights.pth is written in the official key format from a
randomly initialised network.
"""
import importlib.util
import pathlib
import re
import shlex

import numpy as np
import pytest
import torch

from helpers import SHARED, synthetic_video
from stm_model import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)


def blocks(language):
    """[(page:line, code)] of the fenced blocks of one language in every page."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            if match.group(1) == language:
                line = text[:match.start()].count("\n") + 1
                found.append((f"{page.relative_to(ROOT)}:{line}", match.group(2)))
    return found


def commands():
    """[(page:line, argv)] of the shell lines of every bash block (comments dropped)."""
    found = []
    for where, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                found.append((where, shlex.split(line)))
    return found


class _Parsed(Exception):
    pass


def test_the_pages_hold_examples():
    assert len(blocks("python")) >= 7 and len(commands()) >= 30


@pytest.mark.parametrize("where, argv", commands(), ids=lambda value: " ".join(value)[:60]
                         if isinstance(value, list) else value)
def test_every_command_exists_with_its_options(where, argv, monkeypatch):
    program, arguments = argv[0], argv[1:]
    if program == "stm":
        real, depth = cli._Parser.parse_known_args, []

        def parse_only(self, args=None, namespace=None):
            if depth:  # a sub-command's parser, asked by stm's own: parse as usual
                return real(self, args, namespace)
            depth.append(self)
            try:
                parsed, unknown = real(self, args, namespace)
            finally:
                depth.clear()
            if unknown:
                pytest.fail(f"{where}: unrecognized arguments {unknown}")
            raise _Parsed(parsed)
        monkeypatch.setattr(cli._Parser, "parse_known_args", parse_only)
        if arguments == ["--version"]:
            return
        with pytest.raises(_Parsed):
            cli.main(arguments)
    elif program in ("python", "torchrun"):
        if "-m" not in arguments:
            pytest.fail(f"{where}: {' '.join(argv)} runs no module")
        module = arguments[arguments.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        if module == "stm_model.training.loop":
            from stm_model.training import loop as train
            import argparse
            train.add_arguments(argparse.ArgumentParser()).parse_args(
                arguments[arguments.index("-m") + 2:])
    elif program == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
        assert arguments[0] in targets, f"{where}: no make target {arguments[0]}"
    elif program in ("pip", "bash", "pytest", "wget"):
        pass  # installers and the test runner themselves
    else:
        pytest.fail(f"{where}: a command this test does not know: {' '.join(argv)}")


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    """The names the python examples leave to the reader, small."""
    from stm_model import STM, STMConfig
    from stm_model.network.checkpoint import ours_to_official
    torch.manual_seed(0)
    B, Ck, Cv, H, W, T = 2, 16, 32, 6, 8, 3
    frames, labels = synthetic_video(3, size=(32, 48), objects=2)
    labels = torch.from_numpy(labels.astype(np.int64))
    model = STM(STMConfig.small()).eval()
    directory = tmp_path_factory.mktemp("examples")
    from PIL import Image
    from stm_model import io as video_io
    (directory / "frames").mkdir()
    for t, frame in enumerate(frames):  # a folder of frames and its first mask, on disk
        image = (frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(image).save(directory / "frames" / f"{t:05d}.png")
    video_io.write_mask(directory / "first.png", labels[0].numpy())
    official = {ours_to_official(name): value for name, value in
                STM(STMConfig()).state_dict().items()}
    torch.save(official, directory / "STM_weights.pth")
    scribbles = {"sequence": "synth", "scribbles": [[] for _ in range(3)]}
    scribbles["scribbles"][1] = [
        {"path": [[0.2, 0.2], [0.5, 0.6]], "object_id": 1, "start_time": 0, "end_time": 1},
        {"path": [[0.8, 0.3], [0.7, 0.8]], "object_id": 2, "start_time": 1, "end_time": 2}]
    saved = []
    names = dict(
        query_key=torch.randn(1, Ck, H, W), memory_key=torch.randn(B, Ck, T, H, W),
        memory_value=torch.randn(B, Cv, T, H, W), k_chunk=torch.randn(B, Ck, 40),
        v_chunk=torch.randn(B, Cv, 40), padded_key=torch.randn(B, Ck, 60),
        padded_value=torch.randn(B, Cv, 60), lengths=torch.tensor([60, 25]),
        shrinkage=1 + torch.rand(B, 1, T, H, W), selection=torch.rand(1, Ck, H, W),
        my_keys=torch.randn(B, Ck, 50), my_values=torch.randn(B, Cv, 50),
        frames=frames, scribbles=scribbles, model=model,
        frame=frames[0], next_frame=frames[1], labels=labels[0],
        f0=frames[0], f1=frames[1], g0=frames[0].flip(-1), g1=frames[1].flip(-1),
        g2=frames[2].flip(-1), h0=frames[2], m0=labels[0], n0=labels[0].flip(-1),
        p0=labels[2], videos={"bear": (frames, labels[0]), "camel": (frames, labels[0])},
        save=lambda *result: saved.append(result), saved=saved)
    return directory, names


@pytest.mark.parametrize("where, code", blocks("python"), ids=[where for where, _ in
                                                                 blocks("python")])
def test_every_python_example_runs(where, code, namespace, monkeypatch):
    directory, names = namespace
    monkeypatch.chdir(directory)
    scope = dict(names)
    scope.update(_integration_models(code, directory))
    if "stm_kernels.distributed" in code:  # one rank of a world of one
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=0,
                                world_size=1)
        try:
            exec(compile(code, where, "exec"), scope)
        finally:
            dist.destroy_process_group()
    else:
        exec(compile(code, where, "exec"), scope)
    if "segment_videos" in code:
        assert len(names["saved"]) == 6  # three frames of two videos
    if 'FrameReader("frames/")' in code:  # a mask written per frame of the folder
        assert len(list((directory / "out").glob("*.png"))) == 3


def _integration_models(code, directory):
    """The Cutie processor and network, or the STCN processor, an example of
    docs/integrations.md patches: bench.integrations' random-weight builds (skipped without
    the package)."""
    from bench import integrations
    if "stm_kernels.integrations.cutie" in code:
        pytest.importorskip("cutie")
        _, processor, _ = integrations.build_cutie(torch.device("cpu"), directory)
        return dict(processor=processor, network=processor.network)
    if "stm_kernels.integrations.stcn" in code:
        pytest.importorskip("stcnbuf")
        _, stcn, _ = integrations.build_stcn(torch.device("cpu"))
        return dict(stcn=stcn)
    return {}


DAVIS_2016 = SHARED / "data" / "davis2016-val"


@pytest.mark.skipif(not (DAVIS_2016 / "JPEGImages" / "480p" / "blackswan").is_dir(),
                    reason="../shared/data (DAVIS-2016) is absent")
def test_the_segmenting_example_follows_a_real_object(tmp_path, monkeypatch):
    """docs/segmenting.md's frames-on-disk example, as written, on DAVIS's blackswan: the model
    it loads must work on real frames (the shipped small-real scores 0.790 there; the
    synthetic small model 0.004), and it must not warn that it was trained on synthetic
    video."""
    import warnings
    from stm_model import metrics
    from stm_model.io import read_mask
    from stm_model.network.checkpoint import SyntheticOnlyWarning
    [(where, code)] = [(where, code) for where, code in blocks("python")
                       if where.startswith("docs/segmenting.md") and 'FrameReader("frames/")'
                       in code]
    frames = DAVIS_2016 / "JPEGImages" / "480p" / "blackswan"
    annotations = DAVIS_2016 / "Annotations" / "480p" / "blackswan"
    (tmp_path / "frames").symlink_to(frames)
    (tmp_path / "first.png").write_bytes((annotations / "00000.png").read_bytes())
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SyntheticOnlyWarning)
        exec(compile(code, where, "exec"), {})
    names = sorted(path.stem for path in frames.glob("*.jpg"))
    assert sorted(path.stem for path in (tmp_path / "out").glob("*.png")) == names
    result = metrics.evaluate_sequence([read_mask(annotations / f"{name}.png") for name in names],
                                       [read_mask(tmp_path / "out" / f"{name}.png")
                                        for name in names])
    _, scores = metrics.summarize({"blackswan": result})
    print(f"blackswan J&F {scores['J&F-Mean']:.3f}")
    assert scores["J&F-Mean"] >= 0.7, scores
