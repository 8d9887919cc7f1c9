"""`python -m tools.kernel_report`: the static report for every target GPU, as JSON and as the
docs' table (report.py says what is in it).

    python -m tools.kernel_report                         # all targets -> docs/kernel_report.*
    python -m tools.kernel_report --arch sm_80 gfx942     # some targets (printed, not written)
    python -m tools.kernel_report --json                  # print the JSON, write nothing
    python -m tools.kernel_report --quantized             # only the 8-bit forward's rows,
                                                          # put into docs/kernel_report.*

Compiling every target takes about 20 minutes on two cores (--jobs runs targets in parallel).
Exits with status 1 when a row misses a target (report.problems), printing each.
"""
import argparse
import json
import multiprocessing
import subprocess
import sys

from tools.kernel_report import markdown, report
from tools.kernel_report.compile import TARGETS


def _target(arguments):
    return report.target_entry(*arguments)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.kernel_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(TARGETS), default=None,
                        help="targets (default: all, written to docs/)")
    parser.add_argument("--precision", nargs="+", choices=list(report.PRECISIONS), default=None)
    parser.add_argument("--case", nargs="+", choices=list(report.CASES), default=None)
    parser.add_argument("--only", nargs="+", default=None,
                        help="compile and report only these kernels (forward, merge, dv, ...)")
    parser.add_argument("--json", action="store_true", help="print the JSON only")
    parser.add_argument("--jobs", type=int, default=2, help="targets compiled in parallel")
    parser.add_argument("--quantized", action="store_true",
                        help="compile only the 8-bit forward (report.QUANTIZED_TARGETS) and "
                             "replace its rows in the committed report, the rest kept")
    args = parser.parse_args(argv)
    if args.quantized:
        return _quantized_only()
    names = args.arch or list(TARGETS)
    payload = dict(report.header(), commit=_commit())
    jobs = [(name, args.precision, args.case, None, args.only) for name in names]
    if args.jobs > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            entries = pool.map(_target, jobs, chunksize=1)
    else:
        entries = [_target(job) for job in jobs]
    payload["targets"] = dict(zip(names, entries, strict=True))
    if args.arch is None and args.precision is None and args.case is None and \
            args.only is None:
        payload["quantized"] = report.quantized_report()
    problems = report.problems(payload)
    payload["problems"] = problems
    if args.json:
        print(json.dumps(payload))
    elif args.arch is None and args.precision is None and args.case is None and \
            args.only is None:
        report.DOCS.mkdir(exist_ok=True)
        (report.DOCS / "kernel_report.json").write_text(json.dumps(payload, indent=1) + "\n")
        (report.DOCS / "kernel_report.md").write_text(markdown.document(payload))
        print(f"wrote {report.DOCS / 'kernel_report.json'} and kernel_report.md")
    else:
        print(markdown.document(payload))
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _quantized_only():
    """The 8-bit forward's rows compiled again into docs/kernel_report.* (its fingerprint
    too: the plain kernels' rows are the committed ones, whose compiles the 8-bit kernel's
    sources do not change)."""
    path = report.DOCS / "kernel_report.json"
    payload = json.loads(path.read_text())
    payload["quantized"] = report.quantized_report()
    payload["fingerprint"] = report.fingerprint()
    path.write_text(json.dumps(payload, indent=1) + "\n")
    (report.DOCS / "kernel_report.md").write_text(markdown.document(payload))
    print(f"wrote the 8-bit rows into {path} and kernel_report.md")
    return 0


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=report.ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
