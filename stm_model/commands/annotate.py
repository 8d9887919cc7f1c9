"""`stm annotate`: the browser annotation tool's server, until Ctrl-C."""
import errno
import pathlib
import signal
import time

from stm_model.annotate.server import (MAX_OBJECTS, STATE_FOLDER, AnnotationServer,
                                       foreign_results)
from stm_model.cli import UsageError
from stm_model.commands.common import (DEFAULT_INTERACTIVE_CHECKPOINT, claim_output,
                                       describe_results)
from stm_model.commands.models import device_named, load_model

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def annotate(args):
    """Serve the page for one video; every input is checked before the model loads.

    The output folder is held for the server's whole life (claim_output), not only during an
    export: the server saves its session there after every round and a second server (or a
    `stm segment`) into the folder would interleave its rounds and exports with this one's;
    it is refused at start instead."""
    device = device_named(args.device)
    if args.objects > MAX_OBJECTS:
        raise UsageError(f"--objects must be at most {MAX_OBJECTS}; got {args.objects}")
    source = pathlib.Path(args.input)
    if not source.exists():
        raise UsageError(f"{source}: no such folder of frames or video file")
    output = pathlib.Path(args.output or pathlib.Path("stm_output") / source.stem)
    with claim_output(output, "stm annotate"):
        return _serve(args, source, output, device)


def _serve(args, source, output, device):
    """annotate's server until Ctrl-C, holding output's lock."""
    saved = output / STATE_FOLDER / "session.json"
    if args.restart and saved.exists():
        saved.unlink()
    foreign = foreign_results(output)
    if foreign:  # found now, not when the page's export is refused
        raise UsageError(f"{output} holds another run's results ({describe_results(foreign)}), "
                         "which the page's export would replace; choose another --output")
    model = load_model(args.checkpoint or DEFAULT_INTERACTIVE_CHECKPOINT, device)
    try:
        server = AnnotationServer(source, output, model, port=args.port, host=args.host,
                                  max_internal_size=args.max_internal_size,
                                  num_objects=args.objects, device=device,
                                  memory_dtype=args.memory_dtype)
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise UsageError(f"--host {args.host} --port {args.port}: {error.strerror}; choose "
                             "another port (--port 0: any free one)") from None
        raise
    if server.continued:
        print(f"continuing the annotation session saved in {output} ({len(server.rounds)} "
              "rounds, replayed now; --restart starts a new one)")
    if args.host not in LOCAL_HOSTS:
        print(f"warning: --host {args.host}: anyone who reaches this port can see the video "
              f"and write into {output}")
    _stop_on_signals()
    server.start()
    print(f"stm annotate: open {server.url} in a browser (Ctrl-C stops the server)",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    print(f"stopped; the rounds are saved in {output / STATE_FOLDER} (the same command "
          f"continues them), exported files in {output}")
    return 0


def _stop_on_signals():
    """Ctrl-C (SIGINT) and SIGTERM stop the server cleanly: SIGINT even where the shell started
    us with it ignored (a background job), SIGTERM as a service manager or `kill` sends it."""
    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)
