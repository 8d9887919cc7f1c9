"""The self-test's command-line options (`python -m stm_kernels.selftest`, `stm selftest`), in a
module of their own that imports no torch: the `stm` command builds its parsers before anything
does."""

DESCRIPTION = "Self-test of the fused read on this machine: correct against float64, and how fast."


def add_arguments(parser):
    """The self-test's options on an argparse parser (also `stm selftest`'s)."""
    parser.add_argument("--device", default=None,
                        help="torch device to test (default: cuda if available, else cpu)")
    parser.add_argument("--json", default=None,
                        help="report file (default: stm_selftest_<device>_<date>.json here)")
    parser.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    parser.add_argument("--no-timing", action="store_true", help="correctness checks only")
    parser.add_argument("--experimental", action="store_true",
                        help="also check and time the opt-in warp-specialised Gluon kernels "
                             "(forward, dV, dK/dQ; sm_90 GPUs, bf16 and fp16) beside the default "
                             "ones: please attach the report to an issue")
    return parser
