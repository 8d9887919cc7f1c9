"""SegmenterOptions: the segmenters' options declared once, and what is made from them (the
segmenters' keyword arguments, the command-line flags, the refusals of one-video options)."""
import dataclasses
import inspect

import pytest

from stm_model import STM, BatchSegmenter, STMConfig, VideoSegmenter
from stm_model import cli
from stm_model.inference import options as options_module
from stm_model.commands.common import segmenter_options
from stm_model.inference.options import SegmenterOptions


@pytest.fixture(scope="module")
def model():
    return STM(STMConfig.small())


def _keywords(function, *skip):
    return [name for name in inspect.signature(function).parameters
            if name not in ("self", "model", *skip)]


def test_the_segmenters_take_exactly_the_declared_options():
    fields = [field.name for field in dataclasses.fields(SegmenterOptions)]
    assert _keywords(VideoSegmenter.__init__) == fields
    assert _keywords(BatchSegmenter.__init__, "network_batch") == [
        field.name for field in options_module.batch_fields()]


def test_options_are_checked_when_made_naming_the_argument():
    for arguments, message in [(dict(mem_every=0), "mem_every must be a positive integer"),
                               (dict(max_memory_frames=1), "max_memory_frames must be at least 2"),
                               (dict(memory_dtype="float16"), "memory_dtype must be one of"),
                               (dict(amp_dtype="int8"), "amp_dtype must be one of"),
                               (dict(read_backend="cuda"), "read_backend must be one of"),
                               (dict(max_internal_size=8), "max_internal_size must be"),
                               (dict(start_frame=-1), "start_frame must be a frame index"),
                               (dict(offload_chunk_frames=0), "offload_chunk_frames must be")]:
        with pytest.raises(ValueError, match=message):
            SegmenterOptions(**arguments)


def test_segmenters_from_options_keep_them(model):
    options = SegmenterOptions(mem_every=3, memory_dtype="fp16", max_memory_frames=4,
                               max_internal_size=32, start_frame=2, reverse=True)
    video = VideoSegmenter.from_options(model, options)
    assert video.options == options and video.mem_every == 3 and video.start_frame == 2
    assert video.with_options(start_frame=5).options == dataclasses.replace(options,
                                                                            start_frame=5)
    with pytest.raises(ValueError, match="start_frame applies to one video, not to Batch"):
        BatchSegmenter.from_options(model, options)
    batch = BatchSegmenter.from_options(model, SegmenterOptions(mem_every=3, amp_dtype="bf16"))
    assert batch.options == SegmenterOptions(mem_every=3, amp_dtype="bf16")
    assert batch.mem_every == 3


def _flags(parser):
    return {option for action in parser._actions for option in action.option_strings}


def test_the_command_line_flags_are_made_from_the_options():
    commands = cli._Parser(prog="stm").add_subparsers()
    segment = commands.add_parser("segment")
    cli._segment_parser(segment)
    dataset = commands.add_parser("segment-dataset")
    cli._dataset_parser(dataset)
    flagged = options_module.cli_fields()
    one_video = {field.metadata["flag"].name for field in flagged if field.metadata["one_video"]}
    assert {field.metadata["flag"].name for field in flagged} <= _flags(segment)
    for field in flagged:
        if field.metadata["one_video"]:
            continue
        assert field.metadata["flag"].name in _flags(dataset), field.name
    assert one_video == {"--offload", "--offload-chunk-frames", "--size"}
    # --size means one thing: the shorter side the network works at (a dataset run resizes
    # as it reads the frames, as BatchSegmenter takes no size)
    args = dataset.parse_args(["root", "--output", "out", "--size", "240"])
    assert args.max_internal_size == 240 and not hasattr(args, "size")
    # --amp: auto by default on the commands (the Python default stays no autocast)
    for args in (segment.parse_args(["clip"]), dataset.parse_args(["root", "--output", "o"])):
        assert args.amp_dtype == "auto" and segmenter_options(args).amp_dtype == "auto"
    assert SegmenterOptions().amp_dtype is None
    args = segment.parse_args(["clip", "--size", "240", "--amp", "bf16", "--mem-every", "2"])
    assert segmenter_options(args) == SegmenterOptions(mem_every=2, amp_dtype="bf16",
                                                            max_internal_size=240)


@pytest.mark.parametrize("flags, named", [(["--offload"], "--offload"),
                                          (["--offload-chunk-frames", "8"],
                                           "--offload-chunk-frames")])
def test_a_davis_root_refuses_one_video_options_by_flag(tmp_path, capsys, flags, named):
    root = tmp_path / "davis"
    (root / "JPEGImages" / "480p" / "seq").mkdir(parents=True)
    (root / "Annotations" / "480p" / "seq").mkdir(parents=True)
    assert cli.main(["segment", str(root), *flags]) == 2
    error = capsys.readouterr().err
    assert f"{named} applies to one video, not to a DAVIS-format root" in error
