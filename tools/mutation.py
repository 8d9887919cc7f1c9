"""`make mutation`'s two steps around mutmut (docs/testing.md, "Mutation score").

prepare FOLDER FILE...: in a copy of the project, rewrite each top-level function of FILE that
carries decorators (other than typing.overload) into the plain function followed by the same
decorators applied by assignment (`@d def f` -> `def f` ... `f = d(f)`), which Python defines as
the same thing. mutmut 3 makes no mutants of a decorated function (it cannot copy the function
for its trampoline without running the decorator twice); without this step the torch backend's
forward, backward, select, usage and tangents, all under @without_autocast, and the custom ops
of memory_read.py would go untested.

report FOLDER JSON MARKDOWN: mutmut's verdicts (`mutmut results --all true`, run in FOLDER)
counted per mutated file (mutants left "not checked" by a run over some of them are counted
apart, not scored), written as JSON and as a Markdown table with each surviving mutant's
diff (`mutmut show`); prints the table.
"""
import ast
import collections
import json
import pathlib
import subprocess
import sys

KILLED = {"killed", "timeout", "caught by type check"}


def undecorated(source):
    """source with its top-level decorated functions (not @overload) rewritten as above."""
    lines = source.splitlines(keepends=True)
    edits = []  # (first decorator line, def line, line after the body, name, decorators)
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.decorator_list:
            continue
        names = [ast.get_source_segment(source, d) for d in node.decorator_list]
        if any(name in ("overload", "typing.overload") for name in names):
            continue
        first = min(d.lineno for d in node.decorator_list) - 1  # the '@' line, 0-based
        edits.append((first, node.lineno - 1, node.end_lineno, node.name, names))
    for first, define, end, name, names in reversed(edits):
        applied = name
        for decorator in reversed(names):  # the innermost decorator is applied first
            applied = f"{decorator}({applied})"
        lines[end:end] = [f"{name} = {applied}\n"]
        del lines[first:define]
    return "".join(lines)


def prepare(folder, files):
    for file in files:
        path = pathlib.Path(folder) / file
        path.write_text(undecorated(path.read_text()))


def verdicts(folder):
    """{mutant name: status} from `mutmut results --all true`."""
    output = subprocess.run([str(pathlib.Path(sys.executable).parent / "mutmut"), "results",
                             "--all", "true"], cwd=folder, check=True, capture_output=True,
                            text=True).stdout
    found = {}
    for line in output.splitlines():
        name, _, status = line.strip().partition(": ")
        if "__mutmut_" in name:
            found[name] = status
    return found


def module_of(name):
    """stm_kernels.backends.pytorch.x_forward__mutmut_3 -> stm_kernels.backends.pytorch."""
    return name.rsplit(".", 1)[0]


def report(folder, json_path, markdown_path):
    found = verdicts(folder)
    per_module = collections.defaultdict(collections.Counter)
    unchecked = collections.Counter(module_of(name) for name, status in found.items()
                                    if status == "not checked")
    found = {name: status for name, status in found.items() if status != "not checked"}
    for name, status in found.items():
        per_module[module_of(name)][status] += 1
    rows = []
    for module, counts in sorted(per_module.items()):
        total = sum(counts.values())
        killed = sum(n for status, n in counts.items() if status in KILLED)
        rows.append(dict(module=module, mutants=total, killed=killed, survived=total - killed,
                         statuses=dict(counts), not_run=unchecked[module],
                         score=round(100 * killed / total, 1)))
    total = sum(r["mutants"] for r in rows)
    killed = sum(r["killed"] for r in rows)
    survivors = sorted(name for name, status in found.items() if status not in KILLED)
    diffs = {name: subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "mutmut"), "show", name], cwd=folder,
        capture_output=True, text=True).stdout for name in survivors}
    summary = dict(tool="mutmut 3.8.1", mutants=total, killed=killed, survived=total - killed,
                   score=round(100 * killed / max(total, 1), 1), files=rows,
                   survivors={name: found[name] for name in survivors})
    pathlib.Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")
    table = ["| module | mutants | killed | survived | score |", "|---|---|---|---|---|"]
    table += [f"| {r['module']} | {r['mutants']} | {r['killed']} | {r['survived']} | "
              f"{r['score']}% |" for r in rows]
    table.append(f"| all | {total} | {killed} | {total - killed} | {summary['score']}% |")
    text = "\n".join(table) + "\n"
    body = [text, "\n## Survivors\n"]
    for name in survivors:
        body.append(f"\n### {name} ({found[name]})\n\n```diff\n{diffs[name].strip()}\n```\n")
    pathlib.Path(markdown_path).write_text("".join(body))
    print(text, end="")
    print(f"score: {summary['score']}% ({killed} of {total} killed)")


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "prepare":
        prepare(arguments[0], arguments[1:])
    elif command == "report":
        report(*arguments)
    else:
        sys.exit(f"unknown command {command!r}: prepare or report")
