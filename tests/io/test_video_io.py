"""DAVIS-format I/O (stm_model.io): palette, masks, frames, size checks, overlays.

Real-data tests read ../shared/data in place and skip when it is absent; video tests skip
without PyAV.
"""
import itertools
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stm_model import io as video_io
from stm_model.io import (
    DAVIS_PALETTE,
    Frame,
    FrameReader,
    OverlayWriter,
    check_mask_size,
    list_frames,
    masks_for_frames,
    overlay,
    read_frames,
    read_mask,
    write_mask,
    write_overlay,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
DAVIS16 = DATA / "davis2016-val"
OSVOS = DATA / "osvos-davis2017-val-predictions"
CUTIE = DATA / "cutie-examples"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def gradient_frames(n, h, w):
    """n smooth, distinct RGB frames (compress well, so a lossy read-back stays close)."""
    y, x = np.mgrid[0:h, 0:w]
    return [np.stack([(x * 255 // max(w - 1, 1) + 20 * i) % 256,
                      (y * 255 // max(h - 1, 1)) % 256,
                      np.full_like(x, 40 * i % 256)], axis=-1).astype(np.uint8)
            for i in range(n)]


# --- palette and masks ----------------------------------------------------------------------


def test_palette_known_davis_colours():
    assert DAVIS_PALETTE.shape == (256, 3) and DAVIS_PALETTE.dtype == np.uint8
    expected = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128),
                (128, 0, 128), (0, 128, 128), (128, 128, 128), (64, 0, 0), (192, 0, 0),
                (64, 128, 0)]
    assert [tuple(c) for c in DAVIS_PALETTE[:len(expected)].tolist()] == expected
    assert tuple(DAVIS_PALETTE[255].tolist()) == (224, 224, 192)
    assert len({tuple(c) for c in DAVIS_PALETTE.tolist()}) == 256   # all colours distinct
    with pytest.raises(ValueError):
        DAVIS_PALETTE[1] = 0                                          # read-only


def test_palette_matches_real_davis_files():
    path = need(OSVOS / "bmx-trees" / "00000.png")
    with Image.open(path) as im:
        palette = np.array(im.getpalette()[:768], dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(palette, DAVIS_PALETTE[:len(palette)])


def test_write_read_mask_round_trip_ragged(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 255, size=(53, 37))                     # H=53, W=37
    labels[0, 0], labels[-1, -1] = 0, 254  # every object id (255 is DAVIS's void: below)
    path = tmp_path / "sub" / "00000.png"
    write_mask(path, labels)
    back = read_mask(path)
    assert back.dtype == np.int64 and back.shape == (53, 37)
    np.testing.assert_array_equal(back, labels)
    with Image.open(path) as im:
        assert im.mode == "P" and im.size == (37, 53)
        assert im.getpalette()[:768] == DAVIS_PALETTE.flatten().tolist()
    # bool and torch inputs are accepted too
    write_mask(tmp_path / "b.png", torch.tensor([[True, False], [False, True]]))
    np.testing.assert_array_equal(read_mask(tmp_path / "b.png"), [[1, 0], [0, 1]])


@pytest.mark.parametrize("bad, error", [
    (np.full((4, 4), 256), ValueError),
    (np.full((4, 4), -1), ValueError),
    (np.zeros((2, 4, 4), dtype=np.int64), ValueError),
    (np.zeros((4, 4), dtype=np.float32), TypeError),
])
def test_write_mask_rejects_bad_ids(tmp_path, bad, error):
    with pytest.raises(error, match="ids|2-D|integer"):
        write_mask(tmp_path / "m.png", bad)


def test_read_mask_modes(tmp_path):
    gray = np.array([[0, 127, 128, 255], [1, 200, 0, 126]], dtype=np.uint8)
    Image.fromarray(np.where(gray > 127, 255, 0).astype(np.uint8)).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "l.png"), [[0, 0, 1, 1], [0, 1, 0, 0]])
    # gray levels that fit neither DAVIS-2016 (0/255) nor ids 1..32: refused, file named
    Image.fromarray(gray).save(tmp_path / "soft.png")                 # mode 'L'
    with pytest.raises(ValueError, match="soft.png.*gray levels 0, 1, 126"):
        read_mask(tmp_path / "soft.png")

    Image.fromarray(gray > 127).save(tmp_path / "bilevel.png")        # mode '1'
    with Image.open(tmp_path / "bilevel.png") as im:
        assert im.mode == "1"
    np.testing.assert_array_equal(read_mask(tmp_path / "bilevel.png"), gray > 127)

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="'RGB'.*'P'.*'L'.*'1'"):
        read_mask(tmp_path / "rgb.png")

    # ids 1..3 saved as gray levels are read as ids (once they read as background)
    Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8)).save(tmp_path / "ids.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "ids.png"), [[0, 1], [2, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_mask(tmp_path / "l.png")                                 # no warning for 0/255


def test_read_real_davis2016_annotation():
    path = need(DAVIS16 / "Annotations" / "480p" / "blackswan" / "00000.png")
    with Image.open(path) as im:
        assert im.mode == "L"
        raw = np.asarray(im)
    labels = read_mask(path, expected_hw=(480, 854))
    assert labels.shape == (480, 854) and labels.dtype == np.int64
    assert set(np.unique(labels).tolist()) == {0, 1}
    np.testing.assert_array_equal(labels, (raw > 127).astype(np.int64))
    assert 1000 < labels.sum() < labels.size // 2                     # a real, partial object


def test_read_real_osvos_prediction_ids():
    folder = need(OSVOS / "bmx-trees")
    ids = set()
    for path in sorted(folder.glob("*.png"))[:5]:
        labels = read_mask(path, expected_hw=(480, 854))
        ids |= set(np.unique(labels).tolist())
    assert ids == {0, 1, 2}                                           # bmx-trees: 2 objects


# --- frames ---------------------------------------------------------------------------------


def test_read_real_frame_folder():
    folder = need(DAVIS16 / "JPEGImages" / "480p" / "blackswan")
    reader = FrameReader(folder)
    assert not reader.is_video and reader.fps is None
    assert reader.num_frames == len(list(folder.glob("*.jpg"))) == len(reader.names)
    assert reader.names[:3] == ["00000", "00001", "00002"]
    frames = list(itertools.islice(reader, 3))
    assert [f.name for f in frames] == ["00000", "00001", "00002"]
    assert [f.index for f in frames] == [0, 1, 2]
    for frame in frames:
        x = frame.tensor
        assert x.shape == (3, 480, 854) and x.dtype == torch.float32 and x.is_contiguous()
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05  # a real image
        assert frame.image.shape == (480, 854, 3) and frame.image.dtype == np.uint8
        np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), frame.image / 255.0, atol=1e-6)
    ann = need(DAVIS16 / "Annotations" / "480p" / "blackswan" / "00000.png")
    check_mask_size(read_mask(ann), frames[0].hw)                     # same size: no error


def test_read_frames_video():
    pytest.importorskip("av")
    path = need(CUTIE / "example.mp4")
    reader = FrameReader(path)
    assert reader.is_video and reader.fps > 0 and reader.num_frames > 0
    frames = read_frames(path)
    assert iter(frames) is frames                                     # a generator: streams
    count, shapes = 0, set()
    for frame in frames:
        assert frame.name == f"{count:05d}"
        shapes.add(frame.image.shape)
        if count == 0:
            x = frame.tensor
            assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
            assert x.shape == (3, *reader.hw)
        count += 1
    assert count == reader.num_frames
    assert shapes == {(*reader.hw, 3)}


def test_video_without_pyav_says_how_to_install(monkeypatch, tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not really a video")
    monkeypatch.setitem(sys.modules, "av", None)                     # import av -> ImportError
    with pytest.raises(ImportError, match=r"pip install .*stm-kernels\[video\]"):
        FrameReader(video)
    with pytest.raises(ImportError, match=r"stm-kernels\[video\]"):
        OverlayWriter(tmp_path / "out.mp4")


def test_frame_folder_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("no frames here")
    with pytest.raises(FileNotFoundError, match="no frame images"):
        list_frames(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FrameReader(tmp_path / "missing")
    with pytest.raises(ValueError, match="single image"):
        Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
        FrameReader(tmp_path / "a.png")

    seq = tmp_path / "seq"
    seq.mkdir()
    for name, size in [("2.jpg", (8, 6)), ("10.png", (8, 6)), ("1.JPG", (8, 6))]:
        Image.new("RGB", size).save(seq / name, format="PNG" if name.endswith("png") else "JPEG")
    assert [p.name for p in list_frames(seq)] == ["1.JPG", "2.jpg", "10.png"]
    Image.new("RGB", (9, 6)).save(seq / "11.png")
    with pytest.raises(ValueError, match="frame 11 .* 9x6 .* frame 1 is 8x6"):
        list(FrameReader(seq))
    Image.new("RGB", (8, 6)).save(seq / "2.png")
    with pytest.raises(ValueError, match="same name '2'"):
        list_frames(seq)


# --- masks on some frames, and size checks --------------------------------------------------


def test_masks_for_frames_cutie_judo():
    frames = need(CUTIE / "images" / "judo")
    names = FrameReader(frames).names
    masks = masks_for_frames(names, need(CUTIE / "masks" / "judo"))
    assert list(masks) == ["00000", "00005", "00008", "00013"]
    assert all(p.name == f"{n}.png" for n, p in masks.items())
    ids = {name: set(np.unique(read_mask(p)).tolist()) for name, p in masks.items()}
    assert ids == {"00000": {0, 1}, "00005": {0, 2}, "00008": {0, 3}, "00013": {0, 4}}


def test_masks_for_frames_errors(tmp_path):
    write_mask(tmp_path / "00002.png", np.zeros((2, 2), np.int64))
    names = ["00000", "00001", "00002"]
    assert masks_for_frames(names, tmp_path) == {"00002": tmp_path / "00002.png"}
    write_mask(tmp_path / "0.png", np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="0.png .* match no frame"):
        masks_for_frames(names, tmp_path)
    assert list(masks_for_frames(names, tmp_path, strict=False)) == ["00002"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no PNG masks"):
        masks_for_frames(names, empty)


def test_mask_size_mismatch_judo_00005():
    mask_path = need(CUTIE / "masks" / "judo" / "00005.png")
    frame_path = need(CUTIE / "images" / "judo" / "00005.jpg")
    frame = next(f for f in read_frames(frame_path.parent) if f.name == "00005")
    labels = read_mask(mask_path)
    assert labels.shape == (480, 853) and frame.hw == (480, 854)
    with pytest.raises(ValueError) as info:
        check_mask_size(labels, frame.hw, mask_name=mask_path.name)
    message = str(info.value)
    assert "mask 00005.png is 853x480 (WxH) but its frame is 854x480" in message
    with pytest.raises(ValueError, match="853x480 .* 854x480"):
        read_mask(mask_path, expected_hw=frame.hw)
    with pytest.raises(ValueError, match="853x480 .* 854x480"):
        overlay(frame.image, labels)
    # the other judo masks fit their frames
    for name in ["00000", "00008", "00013"]:
        read_mask(CUTIE / "masks" / "judo" / f"{name}.png", expected_hw=frame.hw)


def test_the_mask_modes_docs_name_are_the_ones_read(tmp_path):
    """docs/segmenting.md's Masks paragraph names the modes read_mask reads ('P', 'L', 'I;16',
    'I', '1'); other modes are refused with a message naming the accepted ones."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "segmenting.md").read_text()
    paragraph = text.split("- **Masks**:", 1)[1].split("\n- **", 1)[0]
    assert set(re.findall(r"'([A-Z0-9;]+)'", paragraph)) == {"P", "L", "I;16", "I", "1"}
    ids = np.array([[0, 1], [2, 0]])
    write_mask(tmp_path / "P.png", ids)
    Image.fromarray(ids.astype(np.uint8)).save(tmp_path / "L.png")
    Image.fromarray(ids.astype(np.uint16)).save(tmp_path / "I16.png")
    Image.fromarray(ids > 0).save(tmp_path / "1.png")
    for name, mode in (("P", "P"), ("L", "L"), ("I16", "I;16"), ("1", "1")):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.mode == mode
        assert np.array_equal(read_mask(tmp_path / f"{name}.png"), ids if name != "1" else
                              ids > 0), name
    for mode in ("RGB", "RGBA", "LA"):
        Image.new(mode, (2, 2)).save(tmp_path / f"{mode}.png")
        with pytest.raises(ValueError, match=f"has image mode '{mode}'; accepted: palette 'P'"
                                             r".*'L'.*'I;16' or 'I'.* or bilevel '1'"):
            read_mask(tmp_path / f"{mode}.png")


def test_a_mask_within_one_percent_of_its_frame_is_resized_with_a_note():
    """853 px wide on an 854 px frame (Cutie's judo 00005.png): resized nearest-neighbour,
    every column kept and one doubled; 4 rows short of 480 also fits; 9 columns short (over
    1%) is refused with check_mask_size's message; the right size is returned as it is."""
    labels = np.tile(np.arange(853) % 7, (480, 1))
    resized, note = video_io.fit_mask_size(labels, (480, 854), mask_name="00005.png")
    assert resized.shape == (480, 854) and resized.dtype == labels.dtype
    assert note == ("mask 00005.png is 853x480 (WxH) and its frame 854x480: resized to the "
                    "frame's size (nearest neighbour)")
    assert np.array_equal(resized[:, :427], labels[:, :427])   # column 426 is doubled
    assert np.array_equal(resized[:, 427:], labels[:, 426:])
    assert video_io.fit_mask_size(labels[:476], (480, 853))[0].shape == (480, 853)
    same = labels[:, :845]
    assert video_io.fit_mask_size(same, (480, 845)) == (same, "")
    with pytest.raises(ValueError, match=r"mask m.png is 845x480 \(WxH\) but its frame is "
                                         r"854x480; masks must have their frame's size"):
        video_io.fit_mask_size(same, (480, 854), mask_name="m.png")
    with pytest.raises(ValueError, match="475"):
        video_io.fit_mask_size(labels[:475], (480, 853))


# --- overlays -------------------------------------------------------------------------------


def test_overlay_values():
    frame = np.empty((12, 10, 3), np.uint8)
    frame[:] = (100, 50, 200)
    labels = np.zeros((12, 10), np.int64)
    labels[2:9, 2:7] = 1              # interior object
    labels[6:12, 7:10] = 3            # touches the bottom/right border
    out = overlay(frame, labels, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == frame.shape and out is not frame
    np.testing.assert_array_equal(out[labels == 0], frame[labels == 0])   # background untouched
    np.testing.assert_array_equal(frame[0, 0], (100, 50, 200))             # input not modified
    # interior pixels: halfway to the palette colour; boundary pixels: the colour itself
    np.testing.assert_array_equal(out[5, 4], (114, 25, 100))              # (100,50,200)->(128,0,0)
    np.testing.assert_array_equal(out[2, 4], DAVIS_PALETTE[1])            # top edge of object 1
    np.testing.assert_array_equal(out[8, 2], DAVIS_PALETTE[1])
    np.testing.assert_array_equal(out[9, 8], (114, 89, 100))              # (128,128,0) blend
    np.testing.assert_array_equal(out[11, 9], (114, 89, 100))             # no outline on border
    np.testing.assert_array_equal(out[6, 8], DAVIS_PALETTE[3])            # its top edge
    # alpha 0 without boundary leaves the frame as it is; alpha 1 paints the colour
    np.testing.assert_array_equal(overlay(frame, labels, alpha=0.0, boundary_width=0), frame)
    full = overlay(frame, labels, alpha=1.0, boundary_width=0)
    np.testing.assert_array_equal(full[labels == 1], np.broadcast_to(DAVIS_PALETTE[1], (35, 3)))
    with pytest.raises(ValueError, match="alpha"):
        overlay(frame, labels, alpha=1.5)


def test_overlay_png_folder_writer(tmp_path):
    frames = [Frame(name=f"f{i}", index=i, image=img)
              for i, img in enumerate(gradient_frames(3, 7, 9))]
    labels = np.zeros((7, 9), np.int64)
    labels[2:5, 3:7] = 2
    n = write_overlay(tmp_path / "pngs", frames, {"f1": labels})
    assert n == 3
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["f0.png", "f1.png", "f2.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pngs" / "f0.png")),
                                  frames[0].image)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pngs" / "f1.png")),
                                  overlay(frames[1].image, labels))


@pytest.mark.parametrize("h, w", [(48, 64), (53, 37)])
def test_overlay_gif_writer(tmp_path, h, w):
    frames = gradient_frames(4, h, w)
    labels = np.zeros((h, w), np.int64)
    labels[h // 4:h // 2, w // 4:w // 2] = 1
    with OverlayWriter(tmp_path / "out.gif", fps=10) as writer:
        for image in frames:
            writer.add(image, labels)
    with Image.open(tmp_path / "out.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (w, h)
        assert gif.info["duration"] == 100                            # 1000 / fps ms
        back = np.asarray(gif.convert("RGB"))
    expected = overlay(frames[0], labels).astype(int)
    assert np.abs(back.astype(int) - expected).mean() < 8             # 256-colour quantisation


@pytest.mark.parametrize("h, w", [(48, 64), (53, 37)])
def test_overlay_mp4_writer(tmp_path, h, w):
    av = pytest.importorskip("av")
    frames = gradient_frames(5, h, w)
    labels = np.zeros((h, w), np.int64)
    labels[h // 4:h // 2, w // 4:w // 2] = 2
    assert write_overlay(tmp_path / "out.mp4", frames, [labels] * 5, fps=12) == 5
    with av.open(str(tmp_path / "out.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (w + w % 2, h + h % 2)   # odd sizes padded
        assert float(stream.average_rate) == 12
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 5
    expected = overlay(frames[2], labels).astype(int)
    assert np.abs(decoded[2][:h, :w].astype(int) - expected).mean() < 12  # lossy yuv420p
    # and the reader reads it back
    reader = FrameReader(tmp_path / "out.mp4")
    assert reader.fps == 12 and sum(1 for _ in reader) == 5


def test_overlay_writer_errors(tmp_path):
    with pytest.raises(ValueError, match="output format"):
        OverlayWriter(tmp_path / "out.avi")
    with pytest.raises(ValueError, match="fps"):
        OverlayWriter(tmp_path / "out.gif", fps=0)
    writer = OverlayWriter(tmp_path / "frames")
    writer.add(np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="7x4 .* first frame .* 6x4"):
        writer.add(np.zeros((4, 7, 3), np.uint8))
    with pytest.raises(ValueError, match="mask is 5x4 \\(WxH\\) but its frame 00001 is 6x4"):
        writer.add(np.zeros((4, 6, 3), np.uint8), np.zeros((4, 5), np.int64), name="00001")
    writer.close()
    writer.close()                                                    # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.add(np.zeros((4, 6, 3), np.uint8))
    assert video_io.__all__ and all(hasattr(video_io, n) for n in video_io.__all__)


def test_palette_index_255_is_davis_void_not_an_object(tmp_path):
    """DAVIS marks unlabelled pixels with palette index 255: read as background (never object
    255), and read_annotation says where they are; a DAVIS-2016 gray mask's 255 stays object 1."""
    ids = np.zeros((6, 8), np.uint8)
    ids[1:4, 1:4] = 1
    ids[0, :] = 255  # a void border
    image = Image.fromarray(ids, mode="P")
    image.putpalette(video_io.DAVIS_PALETTE.flatten().tolist())
    image.save(tmp_path / "void.png")
    labels = video_io.read_mask(tmp_path / "void.png")
    assert set(np.unique(labels)) == {0, 1} and (labels[0] == 0).all()
    labels, void = video_io.read_annotation(tmp_path / "void.png")
    assert void.dtype == bool and void[0].all() and not void[1:].any()
    assert np.array_equal(labels, video_io.read_mask(tmp_path / "void.png"))
    gray = np.zeros((6, 8), np.uint8)
    gray[2:5, 2:5] = 255
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    labels, void = video_io.read_annotation(tmp_path / "gray.png")
    assert set(np.unique(labels)) == {0, 1} and not void.any()


def test_16_bit_grayscale_masks_hold_ids(tmp_path):
    """A 16-bit PNG of ids 0/1/2 (as some tools save masks) reads as those ids; 0 and 65535 is
    one object; other values are refused naming them."""
    from PIL import Image
    ids = np.zeros((4, 5), np.uint16)
    ids[1:3, 1:3], ids[0, 0] = 1, 2
    Image.fromarray(ids).save(tmp_path / "ids.png")
    assert Image.open(tmp_path / "ids.png").mode == "I;16"
    np.testing.assert_array_equal(video_io.read_mask(tmp_path / "ids.png"), ids)
    Image.fromarray((ids > 0).astype(np.uint16) * 65535).save(tmp_path / "one.png")
    np.testing.assert_array_equal(video_io.read_mask(tmp_path / "one.png"), ids > 0)
    ids[0, 1] = 300
    Image.fromarray(ids).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"values \[0, 1, 2, 300\]"):
        video_io.read_mask(tmp_path / "bad.png")
