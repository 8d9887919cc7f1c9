"""The kept-launch key (kept_launches._layout_key): what a kept launch is found under. Plain
CPU tests of the key itself (no kernel runs), beside test_prepared_launch.py's reads."""
import types

import torch

from stm_kernels.backends.triton import devices, kept_launches
from stm_kernels.backends.triton.calls import Call
from stm_kernels.backends.triton.tilings import architecture_of


def _tensor(device, dtype=torch.bfloat16, shape=(1, 64, 100)):
    """What the key reads of a tensor (shape, strides, dtype, device), for devices this machine
    lacks."""
    strides = torch.empty(shape, device="meta").stride()
    return types.SimpleNamespace(shape=torch.Size(shape), stride=lambda: strides, dtype=dtype,
                                 device=torch.device(device))


def _key(device, **tensor_options):
    h100 = devices.Device("NVIDIA H100", "nvidia", "sm_90", 227 * 1024, 132)
    architecture, _ = architecture_of(h100)
    call = Call(h100, architecture, "tf32", "16-bit", 64)
    tensors = [_tensor(device, **tensor_options) for _ in range(3)]
    return kept_launches._layout_key("forward", call, 0.125, False, None, *tensors)


def test_two_gpus_of_one_model_keep_launches_of_their_own():
    """Two GPUs of one model share their description (devices.Device holds no index): a
    launch kept for cuda:0 must not be found for cuda:1, whose kernels and streams differ."""
    assert _key("cuda:0") != _key("cuda:1")
    assert _key("cuda:1") == _key("cuda:1")


def test_the_key_holds_every_tensors_dtype_and_shape():
    assert _key("cuda:0", dtype=torch.float16) != _key("cuda:0")
    assert _key("cuda:0", shape=(1, 64, 101)) != _key("cuda:0")
