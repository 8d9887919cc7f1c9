"""The Triton launcher's plans (backends/triton/plans.py) against grids worked out by hand: a
plan is plain integer arithmetic on the host, so these need no device and no interpreter."""
from stm_kernels.backends.triton import plans
from stm_kernels.backends.triton.tilings import DqConfig, ForwardConfig


def test_the_deterministic_dq_plan_takes_every_field_of_its_config():
    """B 2, HW 100, N 200, Cv 200, 2 requested splits: 4 query blocks of 32 rows; 13 memory
    blocks of 16 positions shared by 2 splits, 7 blocks (112 positions) each; value chunks of
    64 channels, 4 of them. Each config field changes the grid when it is dropped (the
    defaults give 2 query blocks, 4 memory blocks of 64 (2 splits of 128), 3 device-filling
    splits, one 256-channel value chunk)."""
    config = DqConfig(block_m=32, block_n=16, block_cv=64, splits=2)
    plan = plans.dq_plan(config, B=2, HW=100, N=200, Cv=200, multiprocessors=132)
    assert plan == dict(grid=(4, 2, 2), splits=2, per_split=112, block_cv=64, num_cv=4)


def test_the_deterministic_dq_plan_fills_the_device_when_no_split_is_asked():
    """B 1, HW 1,620, N 16,200, Cv 512 on 132 multiprocessors: 26 query blocks of 64 rows
    leave room for 132 // 26 = 5 splits of the 507 memory blocks of 32 positions (102 blocks,
    3,264 positions each); the whole 512-channel dO tile (block_cv None)."""
    plan = plans.dq_plan(DqConfig(block_m=64, block_n=32), B=1, HW=1620, N=16200, Cv=512,
                         multiprocessors=132)
    assert plan == dict(grid=(26, 1, 5), splits=5, per_split=3264, block_cv=512, num_cv=1)


def test_the_forward_plan_drops_a_split_that_would_be_empty():
    """N 1,000 in blocks of 64 (16 blocks) over 6 requested splits: 3 blocks (192 positions) a
    split cover the memory in 6 splits; over 7, still 3 blocks a split, so 6 splits."""
    for requested, splits in ((6, 6), (7, 6)):
        plan = plans.forward_plan(ForwardConfig(block_m=64, block_n=64, splits=requested),
                                  B=1, HW=64, N=1000, Cv=512, multiprocessors=132)
        assert (plan.splits, plan.per_split, plan.m_blocks) == (splits, 192, 1)
        assert plan.grid(3) == (1, 3, splits)
