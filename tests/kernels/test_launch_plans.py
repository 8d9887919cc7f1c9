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


def test_the_forward_plan_chunks_the_values_where_its_config_asks():
    """Cv 512 in chunks of 128: 4 value programs per query block (the grid's second axis is B
    times that); no chunk asked: one of 512."""
    for block_v, chunk, chunks in ((128, 128, 4), (None, 512, 1)):
        plan = plans.forward_plan(ForwardConfig(block_m=64, block_n=64, block_v=block_v,
                                                splits=1), B=2, HW=64, N=640, Cv=512,
                                  multiprocessors=132)
        assert (plan.block_v, plan.num_v, plan.grid(2)) == (chunk, chunks, (1, 2 * chunks, 1))


def test_memory_splits_fill_the_device_but_keep_four_blocks_a_split():
    """Unrequested splits: as many as the multiprocessors over the programs, but no fewer
    than 4 memory blocks a split; a request is taken, at most one split a block."""
    assert plans.memory_splits(None, programs=1, n_blocks=1000, multiprocessors=132) == 132
    assert plans.memory_splits(None, programs=1, n_blocks=40, multiprocessors=132) == 10
    assert plans.memory_splits(None, programs=26, n_blocks=1000, multiprocessors=132) == 5
    assert plans.memory_splits(None, programs=200, n_blocks=1000, multiprocessors=132) == 1
    assert plans.memory_splits(7, programs=1, n_blocks=5, multiprocessors=132) == 5


def test_the_gluon_forward_plan_chunks_its_values_in_powers_of_two():
    """The warp-specialised forward at 480p on 132 multiprocessors (HW 1,620 in 13 blocks of
    128 rows, N 16,200 in 254 blocks of 64): 2 value chunks of 256 channels make 26
    programs, 5 splits of 51 blocks; one chunk of all 512 channels, 13 programs, 10 splits of
    26 blocks; 3 chunks round each up to 256 channels, so 2 programs cover the 512."""
    # (value_chunks, block_n, then the plan's block_v, num_v, splits, per_split)
    from stm_kernels.backends.triton.tilings import WarpSpecializedConfig
    cases = ((2, 64, 256, 2, 5, 3264), (1, 64, 512, 1, 10, 1664), (3, 64, 256, 2, 5, 3264),
             (1, 32, 512, 1, 10, 1632))  # blocks of 32 positions: 507, 51 a split
    for value_chunks, block_n, block_v, num_v, splits, per_split in cases:
        plan = plans.warp_specialized_forward_plan(
            WarpSpecializedConfig(block_m=128, block_n=block_n, value_chunks=value_chunks),
            B=1, HW=1620, N=16200, Cv=512, multiprocessors=132)
        assert (plan.block_v, plan.num_v, plan.m_blocks, plan.splits, plan.per_split) == \
            (block_v, num_v, 13, splits, per_split), value_chunks
    # 8 value channels in one chunk: the whole tile, at least 16 wide
    plan = plans.warp_specialized_forward_plan(WarpSpecializedConfig(), B=1, HW=64, N=64,
                                               Cv=8, multiprocessors=132)
    assert (plan.block_v, plan.num_v) == (16, 1)


def test_next_power_of_2_and_cdiv():
    assert [plans.next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 17, 1024, 1025)] == \
        [1, 1, 2, 4, 4, 8, 32, 1024, 2048]
    assert [plans.cdiv(a, 64) for a in (1, 64, 65, 16200)] == [1, 1, 2, 254]


def test_the_forward_plan_counts_every_object_s_programs_when_it_splits():
    """4 objects x 10 query blocks = 40 programs on 132 multiprocessors leave room for 3
    splits of the 100 memory blocks (34 blocks, 2,176 positions each)."""
    plan = plans.forward_plan(ForwardConfig(block_m=64, block_n=64), B=4, HW=640, N=6400,
                              Cv=512, multiprocessors=132)
    assert (plan.m_blocks, plan.splits, plan.per_split) == (10, 3, 2176)
    assert plan.grid(4) == (10, 4, 3)
