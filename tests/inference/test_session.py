"""The session core shared by the three sessions, and the query-feature cache."""
import pytest
import torch

from stm_model import (STM, BatchSegmenter, InteractiveSession, STMConfig, VideoSegmenter,
                       as_interactive)
from stm_model.network.stm import QueryFeatures
from stm_model.memory.query_cache import QueryFeatureCache
from stm_model.inference.session import SessionCore
from stm_model.memory.schedule import check_schedule
from stm_model.inference.options import SegmenterOptions
from stm_model.runtime.devices import amp_dtype_option, dtype_option, memory_dtype_option


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return STM(STMConfig.small())


def test_dtype_options_by_name_or_dtype_and_errors_naming_the_option():
    assert dtype_option("memory_dtype", None) is None
    assert dtype_option("memory_dtype", "bf16") is torch.bfloat16
    assert dtype_option("amp_dtype", torch.float16) is torch.float16
    for bad in ("float16", torch.int8, 16, ["fp16"]):
        with pytest.raises(ValueError, match="cache_dtype must be one of fp32, fp16, bf16"):
            dtype_option("cache_dtype", bad)


@pytest.mark.parametrize("bf16_products", [True, False], ids=["bf16-dot", "no-bf16-dot"])
def test_auto_memory_dtype_is_bf16_on_a_cpu_with_bf16_products(monkeypatch, model,
                                                              bf16_products):
    """memory_dtype="auto" (the CLI's default): bf16 where the CPU multiplies bf16 at twice
    the float32 rate, the model is float32 and no fp16 autocast runs, else the model's
    dtype."""
    monkeypatch.setenv("STM_KERNELS_CPU_BF16", "1" if bf16_products else "0")
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if bf16_products else torch.float32
    assert memory_dtype_option("auto", cpu, torch.float32) is expected
    assert memory_dtype_option("auto", cpu, torch.float16) is torch.float16
    # fp16 autocast cannot mix with a bf16 memory; bf16 autocast can
    assert memory_dtype_option("auto", cpu, torch.float32, torch.float16) is torch.float32
    assert memory_dtype_option("auto", cpu, torch.float32, torch.bfloat16) is expected
    assert memory_dtype_option("auto", torch.device("cuda"), torch.float32) is torch.float32
    assert memory_dtype_option(None, cpu, torch.float32) is torch.float32
    assert memory_dtype_option("fp16", cpu, torch.float32) is torch.float16
    with pytest.raises(ValueError, match="memory_dtype must be one of fp32, fp16, bf16, auto"):
        memory_dtype_option("half", cpu, torch.float32)
    assert SegmenterOptions().memory_dtype == "auto"
    assert VideoSegmenter(model, memory_dtype="auto").memory_dtype is expected
    assert VideoSegmenter(model).memory_dtype is torch.float32  # Python: the model's


@pytest.mark.parametrize("bf16_products", [True, False], ids=["bf16-dot", "no-bf16-dot"])
def test_auto_amp_dtype_is_bf16_autocast_on_a_cpu_with_bf16_products(monkeypatch, model,
                                                                     bf16_products):
    """amp_dtype="auto" (the commands' default): bf16 autocast where the CPU has bf16 dot
    products and the model is float32, else none (a model in another dtype, a CUDA device);
    "fp32", torch.float32 and None: no autocast; fp16 and bf16 as asked on any device."""
    monkeypatch.setenv("STM_KERNELS_CPU_BF16", "1" if bf16_products else "0")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    expected = torch.bfloat16 if bf16_products else None
    assert amp_dtype_option("auto", cpu, torch.float32) is expected
    for model_dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert amp_dtype_option("auto", cpu, model_dtype) is None
    assert amp_dtype_option("auto", cuda, torch.float32) is None
    for no_autocast in ("fp32", torch.float32, None):
        assert amp_dtype_option(no_autocast, cpu, torch.float32) is None
    assert amp_dtype_option("bf16", cpu, torch.float32) is torch.bfloat16
    assert amp_dtype_option("bf16", cpu, torch.bfloat16) is torch.bfloat16
    assert amp_dtype_option(torch.float16, cuda, torch.float32) is torch.float16
    for bad in ("half", torch.int8, "AUTO"):
        with pytest.raises(ValueError, match="amp_dtype must be one of auto, fp32, fp16, bf16"):
            amp_dtype_option(bad, cpu, torch.float32)
        with pytest.raises(ValueError, match="amp_dtype must be one of auto, fp32, fp16, bf16"):
            SegmenterOptions(amp_dtype=bad)
    # the sessions resolve it on the model's device; the Python default stays no autocast
    assert SegmenterOptions().amp_dtype is None and VideoSegmenter(model).amp_dtype is None
    for session in (VideoSegmenter(model, amp_dtype="auto"),
                    BatchSegmenter.from_options(model, SegmenterOptions(amp_dtype="auto"))):
        assert session.amp_dtype is expected
        with session.autocast():
            assert torch.is_autocast_enabled("cpu") is bf16_products
    fp32 = VideoSegmenter(model, amp_dtype="fp32")
    assert fp32.amp_dtype is None
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_schedule_checks():
    check_schedule(1, None)
    check_schedule(5, 2)
    for mem_every in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="mem_every must be a positive integer"):
            check_schedule(mem_every, None)
    with pytest.raises(ValueError, match="max_memory_frames must be at least 2"):
        check_schedule(5, 1)


def test_every_session_is_a_session_core_with_the_same_options(model):
    frames = torch.rand(3, 3, 32, 48)
    sessions = [VideoSegmenter(model, memory_dtype="fp16", amp_dtype="bf16"),
                BatchSegmenter(model, memory_dtype="fp16", amp_dtype="bf16"),
                InteractiveSession(as_interactive(model), frames, 1,
                                   memory_dtype="fp16", amp_dtype="bf16")]
    for session in sessions:
        assert isinstance(session, SessionCore)
        assert session.memory_dtype is torch.float16 and session.amp_dtype is torch.bfloat16
        assert session.model_dtype is torch.float32 and session.device == torch.device("cpu")
        assert session.read_backend == model.config.read_backend
        assert not session.model.training
        with session.autocast():
            assert torch.is_autocast_enabled("cpu")
    bank = sessions[0].new_memory_bank(2, (32, 48), max_frames=4)
    assert (bank.num_objects, bank.dtype, bank.max_frames) == (2, torch.float16, 4)
    plain = VideoSegmenter(model)
    assert plain.memory_dtype is torch.float32 and plain.amp_dtype is None
    with plain.autocast():
        assert not torch.is_autocast_enabled("cpu")
    for session_type in (VideoSegmenter, BatchSegmenter):
        with pytest.raises(ValueError, match="memory_dtype must be one of"):
            session_type(model, memory_dtype="half")
        with pytest.raises(ValueError, match="amp_dtype must be one of"):
            session_type(model, amp_dtype="int8")


def test_query_cache_encodes_each_frame_once_and_batches_in_the_order_asked():
    calls = []

    def encode(frames):
        calls.append(list(frames))
        index = torch.tensor(frames, dtype=torch.float64).view(-1, 1, 1, 1)
        return QueryFeatures(index / 3, index + 0.5, index * 2, index * 3)

    cache = QueryFeatureCache(encode, dtype=torch.float16, device=torch.device("cpu"))
    batch = cache.batch([4, 1, 4], dtype=torch.float32, device=torch.device("cpu"))
    assert calls == [[4, 1]] and len(cache) == 2 and 4 in cache and 0 not in cache
    assert batch.key.dtype is torch.float32 and batch.r2.flatten().tolist() == [12, 3, 12]
    kept = (torch.tensor([4, 1, 4], dtype=torch.float64) / 3).half().float()
    assert torch.equal(batch.key.flatten(), kept)  # kept in the cache's dtype (fp16)
    again = cache.batch([1, 2], dtype=torch.float64, device=torch.device("cpu"))
    assert calls == [[4, 1], [2]] and len(cache) == 3
    assert again.value.flatten().tolist() == [1.5, 2.5]
