"""Synthetic data, training clips, the training loop (loss, resume, DDP) and read equivalence."""
import dataclasses
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from helpers import SHARED, skip_unless_runnable
from stm_model import STM, STMConfig
from stm_model.training.clip_forward import ClipForward
from stm_model.training.datasets import (HELD_OUT_SEEDS, DavisClips, StaticImageClips,
                                         SyntheticClips, collate_clips, max_skip_schedule)
from stm_model.training.synthetic import SyntheticVideo
import stm_model.training.loop as train_module
from stm_model.training.loop import StepSampler, TrainConfig, clip_loss, parameter_groups, train

TINY = dict(model="small", steps=4, batch_size=2, clip_len=3, size=(64, 64), max_objects=2,
            warmup_steps=1, log_every=1, save_every=2, lr=1e-3)


def test_synthetic_videos_are_deterministic_streamable_and_eventful():
    video, again = SyntheticVideo(5), SyntheticVideo(5)
    for t in (0, 57, 1234):
        image, labels = video.render(t)
        image_again, labels_again = again.render(t)
        assert np.array_equal(image, image_again) and np.array_equal(labels, labels_again)
        assert image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    assert not np.array_equal(SyntheticVideo(6).render(0)[0], video.render(0)[0])
    streamed = [labels for _, labels in video.frames(3, start=10, step=7)]
    assert np.array_equal(streamed[2], video.render(24)[1])
    # every object is visible on frame 0; over a long video objects get occluded, leave and
    # come back (an id missing on some frame and visible again later)
    events = 0
    for seed in range(HELD_OUT_SEEDS, HELD_OUT_SEEDS + 4):
        held_out = SyntheticVideo(seed)
        first = held_out.render(0)[1]
        assert set(np.unique(first)) == set(range(held_out.num_objects + 1))
        present = np.array([[(held_out.render(t)[1] == i).any() for i in
                             range(1, held_out.num_objects + 1)] for t in range(0, 1000, 10)])
        events += sum(1 for column in present.T
                      if not column.all() and column[np.argmin(column):].any())
    assert events > 0


def test_clip_datasets_are_deterministic_with_remapped_objects():
    clips = SyntheticClips(10, clip_len=4, size=(64, 64), max_objects=2, max_skip=3, seed=1)
    item, again = clips[3], clips[3]
    assert torch.equal(item["frames"], again["frames"])
    assert item["frames"].shape == (4, 3, 64, 64) and item["labels"].shape == (4, 64, 64)
    assert 1 <= item["num_objects"] <= 2
    assert set(item["labels"][0].unique().tolist()) == set(range(item["num_objects"] + 1))
    static = StaticImageClips(4, clip_len=3, size=(64, 64), seed=2)[0]
    assert static["frames"].shape == (3, 3, 64, 64)
    assert not torch.equal(static["frames"][0], static["frames"][1])  # transformed copies
    three = SyntheticClips(10, clip_len=3, size=(64, 64), max_objects=2, seed=1)[4]
    batch = collate_clips([three, static], max_objects=3)
    assert batch["first_probs"].shape == (2, 3, 64, 64)
    assert batch["object_valid"].sum(1).tolist() == [three["num_objects"], static["num_objects"]]
    assert torch.equal(batch["first_probs"][0, 0], (three["labels"][0] == 1).float())


def test_davis_clips_from_real_data():
    root = SHARED / "data" / "davis2016-val"
    if not root.exists():
        pytest.skip("../shared/data is absent")
    item = DavisClips(root, 2, clip_len=3, size=(96, 160), max_skip=4)[1]
    assert item["frames"].shape == (3, 3, 96, 160) and item["num_objects"] == 1


def test_max_skip_curriculum_and_step_sampler():
    assert [max_skip_schedule(s, 100, 1, 10, 5) for s in (0, 25, 50, 75, 100)] == [1, 6, 10, 8, 5]
    ranks = [list(StepSampler(5, 3, rank, 2, start=2)) for rank in (0, 1)]
    assert set(ranks[0]).isdisjoint(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(2 * 2 * 3, 5 * 2 * 3))


def test_training_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = STM(STMConfig.small()).train()
    batch = collate_clips([SyntheticClips(2, size=(64, 64), seed=3)[i] for i in range(2)], 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = clip_loss(ClipForward(model), batch, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("config", [STMConfig.small(), STMConfig.small_real()],
                         ids=["resnet", "efficientnet-lite0"])
def test_a_trunk_lr_scale_of_zero_leaves_the_pretrained_trunks_as_they_are(config):
    torch.manual_seed(0)
    model = STM(config).train()
    groups = parameter_groups(model, 1e-3, 0.0)
    assert [group["lr"] for group in groups] == [0.0, 1e-3]
    names = {id(p): name for name, p in model.named_parameters()}
    trunk = {names[id(p)] for p in groups[0]["params"]}
    rest = {names[id(p)] for p in groups[1]["params"]}
    assert trunk | rest == set(names.values()) and not trunk & rest
    assert "memory_encoder.mask_conv.weight" in rest and "decoder" in " ".join(rest)
    assert all(name.startswith(("memory_encoder.", "query_encoder.")) for name in trunk)
    assert any(name.startswith("query_encoder.") for name in trunk)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = collate_clips([SyntheticClips(2, size=(64, 64), seed=3)[i] for i in range(2)], 3)
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    clip_loss(ClipForward(model), batch, torch.device("cpu")).backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= rest
    assert len(parameter_groups(model, 1e-3, 1.0)) == 1
    with pytest.raises(ValueError, match="trunk_lr_scale must be in"):
        TrainConfig(trunk_lr_scale=1.5)


def test_bootstrapped_cross_entropy_averages_the_hardest_pixels():
    """keep=1 is the plain mean; keep=0.25 the mean of the quarter of the batch's pixels with
    the largest loss (against the per-pixel losses of the same logits); the share follows
    STCN's schedule scaled to the run."""
    torch.manual_seed(0)
    batch = collate_clips([SyntheticClips(2, size=(32, 32), seed=5)[i] for i in range(2)], 3)

    class Recorded:  # a forward that also keeps its logits
        def __init__(self, forward):
            self.forward, self.logits = forward, None

        def __call__(self, *arguments):
            self.logits = self.forward(*arguments)
            return self.logits

    forward = Recorded(ClipForward(STM(STMConfig.small()).eval()))
    with torch.no_grad():
        plain = clip_loss(forward, batch, torch.device("cpu"))
        targets = batch["labels"][:, 1:].flatten(0, 1)
        pixels = torch.nn.functional.cross_entropy(
            forward.logits.flatten(0, 1), targets, reduction="none").flatten()
        hard = clip_loss(forward, batch, torch.device("cpu"), keep=0.25)
    assert torch.allclose(plain, pixels.mean(), rtol=1e-5)
    quarter = pixels.sort(descending=True).values[:int(0.25 * pixels.numel())]
    assert torch.allclose(hard, quarter.mean(), rtol=1e-4) and hard > plain
    fraction = train_module.hardest_fraction
    assert [fraction(s, 100, 0.15) for s in (0, 20, 50, 80, 99)] == pytest.approx(
        [1.0, 1.0, 0.575, 0.15, 0.15])
    assert fraction(50, 100, 1.0) == 1.0
    with pytest.raises(ValueError, match="bootstrap must be in"):
        TrainConfig(bootstrap=0.0)


def _model_gradients(read, batch, dtype):
    torch.manual_seed(0)
    model = STM(STMConfig.small(read_backend=read)).train().to(dtype)
    batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in batch.items()}
    loss = clip_loss(ClipForward(model), batch, torch.device("cpu"))
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_and_naive_reads_give_the_same_gradients_in_the_model(backend):
    # float32 rounding is amplified through train-mode BatchNorm and ~20 layers, so the fused
    # read is held to the naive read's own float32 error against a float64 naive reference, or
    # to 1e-3, whichever is larger: which float32 read lands closer varies with the machine's
    # BLAS kernels (on one 2-core x86 machine the naive read's worst parameter was 4.4e-4 off
    # and the fused read's 6.3e-4, but at memory_encoder.conv1 7e-5 against 6.3e-4: the fused
    # backward's delta = rowsum(dO * O) cancels in dP - delta, as in FlashAttention).
    skip_unless_runnable(backend, "cpu")
    batch = collate_clips([SyntheticClips(2, clip_len=4, size=(64, 64), seed=4)[i]
                           for i in range(2)], 2)
    ref_loss, reference = _model_gradients("naive", batch, torch.float64)
    if backend == "torch":  # same math in float64: agreement to rounding
        loss64, grads64 = _model_gradients("torch", batch, torch.float64)
        assert torch.allclose(loss64, ref_loss, rtol=1e-12)
        for name, grad in grads64.items():
            scale = reference[name].norm().clamp_min(1e-6)
            assert (grad - reference[name]).norm() / scale < 1e-10, name
    errors = {}
    for read in (backend, "naive"):
        loss, grads = _model_gradients(read, batch, torch.float32)
        assert torch.allclose(loss, ref_loss, rtol=1e-5)
        errors[read] = {n: ((g - reference[n]).norm() / reference[n].norm().clamp_min(1e-6)).item()
                        for n, g in grads.items()}
    for name, naive_error in errors["naive"].items():
        bound = max(1.5 * naive_error, 1e-3)
        assert errors[backend][name] <= bound, (name, errors[backend][name], naive_error)


def test_resumed_training_equals_uninterrupted_training(tmp_path, monkeypatch):
    straight = train(TrainConfig(output=str(tmp_path / "straight"), **TINY), show_progress=False)
    config = TrainConfig(output=str(tmp_path / "resumed"), **TINY)
    calls, real_loss = [], train_module.clip_loss

    def killed_in_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C in step 4: step 3 is saved (save_every is 2)
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(train_module, "clip_loss", killed_in_step_4)
    with pytest.raises(KeyboardInterrupt, match="kept step 3 of 4"):
        train(config, show_progress=False)
    monkeypatch.setattr(train_module, "clip_loss", real_loss)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 3
    resumed = train(config, show_progress=False)
    pairs = zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        assert torch.equal(a, b), name
    log = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and [line.split(",")[0] for line in log[1:]] == \
        ["1", "2", "3", "4"]
    assert (tmp_path / "resumed" / "model.pt").exists()
    with pytest.warns(UserWarning, match="steps: 4 -> 6"):  # extending a finished run
        train(dataclasses.replace(config, steps=6), show_progress=False)


def _free_port():
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def _ddp_worker(rank, port, output):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model = train(TrainConfig(output=output, **dict(TINY, steps=2, batch_size=1)),
                  show_progress=False)
    torch.save(model.state_dict(), f"{output}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_on_two_cpu_processes_keeps_the_replicas_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    replicas = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    torch.manual_seed(0)  # train() seeds with TrainConfig.seed before building the model
    initial = STM(STMConfig.small())
    changed = 0
    for name, tensor in replicas[0].items():
        assert torch.equal(tensor, replicas[1][name]), name
        changed += not torch.equal(tensor, initial.state_dict()[name])
    assert changed > 0  # they trained, identically


def test_checkpointing_levels_give_the_same_gradients():
    batch = collate_clips([SyntheticClips(1, clip_len=3, size=(64, 64), seed=5)[0]], 2)
    gradients = []
    for level in ("none", "encoders", "all"):
        torch.manual_seed(0)
        model = STM(STMConfig.small()).train()
        clip_loss(ClipForward(model, checkpointing=level), batch, torch.device("cpu")).backward()
        gradients.append([p.grad for p in model.parameters()])
    for other in gradients[1:]:
        for a, b in zip(gradients[0], other, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        ClipForward(STM(STMConfig.small()), checkpointing="decoder")
