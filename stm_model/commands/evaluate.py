"""`stm eval`: DAVIS J&F of result masks against annotations."""
import pathlib
import re
import sys

import numpy as np

from stm_model import io as video_io
from stm_model import metrics
from stm_model.cli import UsageError
from stm_model.io.files import can_write_into


def _sequences(results, annotations, only):
    """[(name, results folder, annotations folder)]."""
    if any(annotations.glob("*.png")):
        return [(annotations.name, results, annotations)]
    names = only or sorted(p.name for p in annotations.iterdir() if p.is_dir())
    if not names:
        raise UsageError(f"no annotation PNGs or sequence folders in {annotations}")
    missing = [name for name in names if not (results / name).is_dir()]
    if missing:
        raise UsageError(f"results lack sequences {missing} (looked in {results})")
    return [(name, results / name, annotations / name) for name in names]


def evaluate(args):
    """`stm eval`: per-object and global J&F, printed and written as the DAVIS CSV files."""
    return evaluate_results(args.results, args.annotations, args.sequences, args.output,
                            davis2016=args.davis2016)


def evaluate_results(results, annotations, sequences=None, output=None, davis2016=False):
    """J&F of result masks against annotations (see `stm eval`); prints the table and writes
    the two DAVIS CSVs to output (default: the results folder). davis2016: every object id
    counts as one foreground object (the DAVIS-2016 single-object protocol)."""
    results, annotations = pathlib.Path(results), pathlib.Path(annotations)
    for what, folder in (("results", results), ("annotations", annotations)):
        if not folder.is_dir():
            raise UsageError(f"the {what} folder {folder} does not exist")
    target = pathlib.Path(output or results)
    if not can_write_into(target):  # before the work, not after it
        hint = "choose another --output" if output else "pass --output DIR for the CSV files"
        raise UsageError(f"cannot write the CSV files into {target} (read-only or not a "
                         f"folder); {hint}")
    scored = {}
    for name, result_folder, annotation_folder in _sequences(results, annotations, sequences):
        truth_paths = sorted(annotation_folder.glob("*.png"))
        missing = [p.name for p in truth_paths if not (result_folder / p.name).exists()]
        if missing:
            hint = ""
            if any((result_folder / "masks").glob("*.png")):  # `stm segment`'s output folder
                hint = f"; the masks are in {result_folder / 'masks'}: give that folder"
            raise UsageError(f"{name}: no result for {len(missing)} annotated frames "
                             f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
                             f"{hint}")
        truth, void = zip(*(video_io.read_annotation(p) for p in truth_paths), strict=True)
        predicted = []
        for path, annotation in zip(truth_paths, truth, strict=True):
            result = video_io.read_mask(result_folder / path.name)
            if result.shape != annotation.shape:
                raise UsageError(f"{name}: result {path.name} is {result.shape[1]}x"
                                 f"{result.shape[0]} (WxH) but its annotation is "
                                 f"{annotation.shape[1]}x{annotation.shape[0]}; results must "
                                 "have the annotations' size")
            predicted.append(result)
        if davis2016:  # one object: the union of all of them
            truth = [(t > 0).astype(np.int64) for t in truth]
            predicted = [(p > 0).astype(np.int64) for p in predicted]
        try:
            scored[name] = metrics.evaluate_sequence(truth, predicted, void=void)  # void: out
        except ValueError as error:  # name the sequence and the frame's file
            names = [path.name for path in truth_paths]
            message = re.sub(r"frame (\d+)", lambda m, names=names: names[int(m.group(1))],
                             str(error), count=1)
            hint = "" if davis2016 else " (--davis2016 scores any object as the foreground)"
            raise UsageError(f"{name}: {message}{hint}") from None
    per_object, global_row = metrics.summarize(scored)
    # the files first: a reader that closes stdout early (`| head`) must not cost them
    paths = metrics.write_csvs(pathlib.Path(output or results), per_object, global_row)
    print(metrics.format_table(per_object, global_row))
    for name, result in scored.items():  # a NaN row would otherwise go unexplained
        frames = result["J"].shape[1]
        if frames < 3:
            print(f"note: {name} has {frames} annotated frame{'s' * (frames != 1)}: the "
                  "semi-supervised protocol scores frames 1..T-2 (the first is the given "
                  "mask), so none is scored (nan)", file=sys.stderr)
    print("wrote " + " and ".join(map(str, paths)))
    return 0
