"""The faults Triton 3.6 (torch 2.11's, on the GPU machines) showed on sm_90, kept out of the
kernels and their tables (bench/NOTES.md, GPU sessions of 2026-11-26 and the offline entry of
2026-11-27).

1. Wrong dK/dQ gradients on an H100 for the dK+dQ kernel with 64 key rows over 16 query rows on
   4 warps: K(64, 16, w4, s2, None) (err 20-108), its stream_keys twin (0.067), K(64, 16, w4,
   s1, 64) (inf, 343) and K(64, 16, w4, s1, 32) (an out-of-bounds shared-memory read in the
   compiler's layout of a tl.dot), with no memcheck error and no race; the interpreter gives the
   float64 gradients at all four. The rule held here is that geometry, whatever the stages,
   value chunk or key streaming: no sm_90 table row uses it, first candidate or fallback.
2. The int64-offset kernels failed to compile under Triton 3.6 ("at 36:10", "at 28:43") and
   fell back to torch: `tile_offsets` returned int64 offsets from one branch of `if I64:` and
   int32 from the other, and Triton 3.6 type-checks every return of a jitted function, the
   untaken constexpr branch's too (3.8 drops it). Each jitted function now returns once.
"""
import ast
import dataclasses
import pathlib

from stm_kernels.backends.triton import tilings

KERNELS = pathlib.Path(tilings.__file__).parent / "kernels"
# The geometry of fault 1, as bench/NOTES.md states it: block_n key rows, block_m query rows.
SM90_DKDQ_FAULT = dict(block_n=64, block_m=16, num_warps=4)
DKDQ_KERNELS = ("dkdq", "dk")  # the dK+dQ kernel and the deterministic dK (the same code)


def _matches(config, fields):
    return all(getattr(config, name) == value for name, value in fields.items())


def test_no_sm90_table_row_uses_the_dkdq_tiling_triton_36_compiles_wrong():
    hopper = tilings.ARCHITECTURES["sm_90"]
    offending = [(key, config) for key, configs in hopper.tilings.items()
                 if key[0] in DKDQ_KERNELS for config in configs
                 if isinstance(config, tilings.DkdqConfig) and _matches(config, SM90_DKDQ_FAULT)]
    assert offending == []
    # every dK/dQ lookup sm_90 can make (twins and key widths resolved) finds none either
    for kernel in DKDQ_KERNELS:
        for precision in tilings.PRECISIONS:
            for width in tilings.KEY_WIDTHS:
                try:
                    configs = hopper.candidates(kernel, precision, width)
                except KeyError:
                    continue
                assert not any(_matches(c, SM90_DKDQ_FAULT) for c in configs), \
                    (kernel, precision, width, configs)


def test_the_fault_is_stated_where_the_search_and_readers_find_it():
    """tilings.MISCOMPILED holds the rule (the search skips its tilings); it matches the four
    measured tilings and not the sm_90 defaults."""
    K = tilings.DkdqConfig
    measured = [K(64, 16, 4, 2, None), K(64, 16, 4, 2, None, stream_keys=True),
                K(64, 16, 4, 1, 64), K(64, 16, 4, 1, 32)]
    for config in measured:
        assert _matches(config, SM90_DKDQ_FAULT)
        for kernel in DKDQ_KERNELS:
            assert tilings.miscompiled("sm_90", kernel, config), config
        assert not tilings.miscompiled("sm_100", "dkdq", config)  # other compile paths
        assert not tilings.miscompiled("sm_90", "dv", dataclasses.replace(config))
    hopper = tilings.ARCHITECTURES["sm_90"]
    for (kernel, _, _), configs in hopper.tilings.items():
        assert not any(tilings.miscompiled("sm_90", kernel, c) for c in configs), kernel


def test_other_architectures_keep_their_tilings_with_a_note_in_the_docs():
    """gfx950, sm_100 and the generic and AMD 256-channel rows use the geometry, compiled by
    other code paths (AMD's, tcgen05, mma.sync): kept, and said so in docs/kernels.md."""
    users = sorted({name for name, architecture in tilings.ARCHITECTURES.items()
                    for key, configs in architecture.tilings.items() if key[0] in DKDQ_KERNELS
                    for config in configs if _matches(config, SM90_DKDQ_FAULT)})
    assert "sm_90" not in users and users
    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "kernels.md").read_text()
    assert "K(64, 16, w4" in text and all(name in text for name in ("gfx950", "sm_100"))


def _jitted_functions():
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(
                    "jit" in ast.unparse(decorator) for decorator in node.decorator_list):
                yield path.name, node


def _returns(function):
    """The return statements of a function, not of functions nested in it."""
    found, stack = [], list(function.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Return):
            found.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))
    return found


def test_no_jitted_function_returns_from_a_branch_on_the_int64_flag():
    """Triton 3.6 type-checks both returns of `if I64: return <int64> / return <int32>`: a
    function that takes I64 returns once (assign in the branches, return after them)."""
    functions = list(_jitted_functions())
    assert any(node.name == "tile_offsets" for _, node in functions)
    for name, node in functions:
        if "I64" not in [argument.arg for argument in node.args.args]:
            continue
        for branch in ast.walk(node):
            if isinstance(branch, ast.If) and "I64" in ast.unparse(branch.test):
                inside = _returns(ast.Module(body=branch.body + branch.orelse, type_ignores=[]))
                assert not inside, \
                    f"{name}: {node.name} returns inside `if {ast.unparse(branch.test)}`"
