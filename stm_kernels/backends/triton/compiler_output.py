"""Compiler output kept off the user's terminal while candidate tilings are tried.

Triton's compiler (MLIR passes, LLVM, ptxas) writes its diagnostics straight to file
descriptor 2, not through Python: a candidate that fails to compile on a GPU newer than the
installed Triton prints an assertion and hundreds of lines of MLIR before the launcher moves on
to the next candidate or to the torch backend. `captured()` redirects descriptor 2 to a
temporary file for the duration of one attempt; the launcher then replays the text where the
attempt succeeded (nothing is lost) and, where it failed, keeps it in a log file named in the
one-line fallback warning.
"""
import contextlib
import os
import sys
import tempfile

# Lines that say what went wrong, in the order they are looked for.
_DIAGNOSTIC_MARKS = ("Assertion", "error:", "LLVM ERROR", "ptxas fatal", "ptxas error")


class Output:
    """What was written to descriptor 2 during a `captured()` block (text, once it ends)."""

    def __init__(self):
        self.text = ""

    def diagnostic(self):
        """What the first line that says what went wrong says (an assertion, an error), from
        its mark on and at most 160 characters; "" when there is none."""
        lines = self.text.splitlines()
        for mark in _DIAGNOSTIC_MARKS:
            for line in lines:
                if mark in line:
                    return line[line.index(mark):].strip()[:160]
        return ""

    def replay(self):
        """Write the text to stderr, where it would have gone."""
        if self.text:
            sys.stderr.write(self.text)
            sys.stderr.flush()

    def save(self, name):
        """Append the text to `stm_kernels_<name>_<pid>.log` in the temporary directory and
        return its path (None when there is nothing to keep or it cannot be written)."""
        if not self.text.strip():
            return None
        path = os.path.join(tempfile.gettempdir(), f"stm_kernels_{name}_{os.getpid()}.log")
        try:
            with open(path, "a", encoding="utf-8") as log:
                log.write(self.text)
        except OSError:
            return None
        return path


@contextlib.contextmanager
def captured(enabled=True):
    """Within the block, what anything in the process writes to descriptor 2 goes to an
    Output instead (yielded; its text is set when the block ends). Disabled, or where the
    descriptor cannot be redirected, the block runs as it is and the Output stays empty."""
    output = Output()
    if not enabled:
        yield output
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (a closed or replaced stderr)
        yield output
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield output
        finally:
            try:
                sys.stderr.flush()
            except ValueError:
                pass
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            output.text = sink.read().decode("utf-8", errors="replace")
