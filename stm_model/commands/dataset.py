"""`stm segment-dataset`: every sequence of a DAVIS-format root, in batches, over torchrun's
ranks."""
import dataclasses
import pathlib
import sys
import time

import torch

from stm_model.cli import UsageError
from stm_model.commands.common import (DEFAULT_CHECKPOINT, check_folder, segmenter_options,
                                       write_json)
from stm_model.commands.models import build_model, check_model_arguments, device_named
from stm_model.commands.evaluate import evaluate_results
from stm_model.inference import dataset_runs as dataset_segmentation
from stm_model.inference.batch_segmenter import BatchSegmenter
from stm_model.inference.resize import model_internal_size
from stm_model.io.run_lock import OutputInUse, output_lock
from stm_model.runtime import cpu_allocator, distributed
from stm_model.runtime.devices import peak_memory_bytes


def _dataset_plan(args, world_size, lock):
    """(shares: one list of Sequences per rank, names of complete sequences) or an error; the
    output's lock is taken first (a run already writing into it is the error)."""
    try:
        lock.acquire()
    except OutputInUse as error:
        return {"error": str(error)}
    try:
        sequences = dataset_segmentation.list_sequences(
            args.root, args.resolution, args.sequences, args.masks)
    except (FileNotFoundError, ValueError) as error:
        return {"error": str(error)}
    todo, done = dataset_segmentation.split_complete(sequences, args.output)
    return {"shares": dataset_segmentation.balanced_split(todo, world_size),
            "complete": [s.name for s in done], "all": [s.name for s in sequences]}


def segment_dataset(args):
    """`stm segment-dataset`: every sequence, --batch-size at a time, split over torchrun's
    ranks; rank 0 prints the table, writes OUTPUT/segment_summary.json, optionally evaluates.
    Rank 0 holds OUTPUT's lock for the whole run (output_lock): a second run into it is
    refused at start, on every rank."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1; got {args.batch_size}")
    check_model_arguments(args)
    device_named(args.device)  # a clear error for an unknown or absent device
    check_folder(pathlib.Path(args.output))
    context = distributed.setup(args.device)
    lock = output_lock(args.output, "stm segment-dataset", enabled=context.is_main)
    try:
        return _segment_dataset(args, context, lock)
    finally:
        lock.release()


def _segment_dataset(args, context, lock):
    """segment_dataset once the processes are set up; rank 0 takes the lock in the plan."""
    try:
        plan = distributed.broadcast(
            _dataset_plan(args, context.world_size, lock) if context.is_main else None, context)
        if "error" in plan:
            raise UsageError(plan["error"])
        device = context.device
        if device.type == "cpu":
            cpu_allocator.keep_freed_memory()  # no page faults per step (see the module)
        if args.random_weights:
            torch.manual_seed(0)  # every rank builds the same untrained model
        model = build_model(args, device)
        # --size: the frames are resized as they are read (segment_sequences), not by the
        # segmenter
        options = dataclasses.replace(segmenter_options(args), max_internal_size=None)
        segmenter = BatchSegmenter.from_options(model, options)
        mine = plan["shares"][context.rank]
        if context.is_main and plan["complete"]:
            print(f"skipping {len(plan['complete'])} complete sequences in {args.output}",
                  file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        summaries = dataset_segmentation.segment_sequences(
            segmenter, mine, args.output, args.batch_size,
            max_internal_size=model_internal_size(model, args.max_internal_size),
            workers=args.workers, show_progress=context.is_main and not args.quiet,
            rank=context.rank, max_objects=args.max_objects)
        info = dict(rank=context.rank, device=str(device),
                    seconds=time.perf_counter() - start,
                    peak_memory_bytes=peak_memory_bytes(device))
        gathered = distributed.gather((summaries, info), context)
    finally:
        distributed.teardown(context)
    if not context.is_main:
        return 0
    dataset_segmentation.remove_incomplete_folder(args.output)
    summaries = sorted((s for part, _ in gathered for s in part), key=lambda s: s["name"])
    ranks = [info for _, info in gathered]
    print(dataset_segmentation.format_report(summaries, ranks))
    print(f"{len(summaries)} sequences segmented, {len(plan['complete'])} already complete "
          f"(skipped); batch size {args.batch_size}, {context.world_size} process(es); masks "
          f"in {args.output}")
    write_json(pathlib.Path(args.output) / "segment_summary.json", dict(
        sequences=summaries, skipped=plan["complete"], ranks=ranks,
        batch_size=args.batch_size, world_size=context.world_size,
        max_internal_size=model_internal_size(model, args.max_internal_size),
        checkpoint=None if args.random_weights else (args.checkpoint or DEFAULT_CHECKPOINT),
        mem_every=args.mem_every, masks=args.masks))
    if args.eval:
        evaluate_results(args.output, pathlib.Path(args.root) / "Annotations" / args.resolution,
                         plan["all"])
    return 0
