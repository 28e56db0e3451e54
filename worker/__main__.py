"""The worker process: one per model. Loads it, then loops: drain the inbox, step while there is work, send ONE
StepOutput per step. A reader thread owns the socket's input, so the busy loop never waits on I/O.

A heartbeat thread sends a `Heartbeat` every few seconds whatever the loop is doing, with the process's CPU time:
a step that runs long (a big prompt on a CPU) keeps burning CPU, a deadlocked loop does not, and a stopped process
sends nothing. The API process judges from that (app.liveness); the worker only reports.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path

import msgspec

from worker import faults, transport
from worker.embed.engine import EmbedEngine
from worker.engine import Engine
from worker.loader import load_model
from worker.messages import (
    AbortRequest,
    AddRequest,
    Heartbeat,
    InvalidRequest,
    RequestOutput,
    Shutdown,
    StepOutput,
    ToWorker,
    WorkerError,
)
from worker.registry import load_registry
from worker.runtime import HeapTrimmer, ThreadGovernor, configure_threads

log = logging.getLogger("tokenmill.worker")


def _reader(sock: socket.socket, inbox: queue.Queue[ToWorker | None]) -> None:
    try:
        while True:
            inbox.put(transport.recv(sock, transport.to_worker_decoder))
    except (transport.ConnectionClosed, OSError, msgspec.DecodeError, ValueError) as exc:
        log.info("connection to the API process ended: %s", exc)
    inbox.put(None)


class StepClock:
    """When the step now running began (0.0 between steps): written by the loop, read by the heartbeat thread."""

    started = 0.0


def _heartbeat(
    sender: transport.Sender, engine: Engine | EmbedEngine, clock: StepClock, period: float, stop: threading.Event
) -> None:
    try:
        while not stop.wait(period):
            now, started = time.monotonic(), clock.started
            running = now - started if started else 0.0
            sender.send(Heartbeat(now, time.process_time(), engine.step_count, running))
    except OSError as exc:
        log.info("heartbeat stopped: %s", exc)


def serve(
    sock: socket.socket,
    engine: Engine | EmbedEngine,
    heartbeat_seconds: float = 1.0,
    governor: ThreadGovernor | None = None,
) -> None:
    """`governor`: adapts torch's threads to the cores other processes leave free (None: the count stays)."""
    sender = transport.Sender(sock)  # the loop and the heartbeat thread both write frames
    inbox: queue.Queue[ToWorker | None] = queue.Queue()
    threading.Thread(target=_reader, args=(sock, inbox), name="tokenmill-reader", daemon=True).start()
    sender.send(engine.model_info())
    clock, stop = StepClock(), threading.Event()
    beat_args = (sender, engine, clock, heartbeat_seconds, stop)
    threading.Thread(target=_heartbeat, args=beat_args, name="tokenmill-heartbeat", daemon=True).start()
    try:
        _loop(sender, inbox, engine, clock, governor)
    finally:
        stop.set()


def _loop(
    sender: transport.Sender,
    inbox: queue.Queue[ToWorker | None],
    engine: Engine | EmbedEngine,
    clock: StepClock,
    governor: ThreadGovernor | None,
) -> None:
    trimmer = HeapTrimmer()
    trimmer.trim()  # what loading and packing the weights freed (25 MiB for SmolLM2)
    while True:
        trimmer.maybe_trim()
        rejected: list[RequestOutput] = []
        block = not engine.has_work()
        while True:
            try:
                message = inbox.get(block=block)
            except queue.Empty:
                break
            block = False
            if message is None or isinstance(message, Shutdown):
                return
            if isinstance(message, AddRequest):
                try:
                    engine.add_request(message.request_id, message.prompt_token_ids, message.params)
                except InvalidRequest as exc:
                    rejected.append(RequestOutput.refused(message.request_id, exc))
            elif isinstance(message, AbortRequest):
                engine.abort(message.request_ids)
        if engine.has_work():
            if governor is not None:
                governor.adjust()
            clock.started = time.monotonic()
            out = engine.step()
            clock.started = 0.0
            out.outputs.extend(rejected)
            sender.send(out)
        elif rejected:
            sender.send(StepOutput(engine.step_count, rejected, engine.stats()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description="tokenmill worker process (one model)")
    parser.add_argument("--models", required=True, help="the models.yaml registry")
    parser.add_argument("--model", required=True, help="the entry's name")
    parser.add_argument("--socket", required=True, help="Unix-domain socket of the API process")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--heartbeat-seconds", type=float, default=1.0, help="period of the liveness heartbeat")
    parser.add_argument("--log-level", default="INFO", help="DEBUG logs every step's rows, time and prices")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s worker[{args.model}] %(levelname)s %(message)s"
    )

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    try:
        entry = load_registry(args.models).get(args.model)
        configure_threads(entry.threads)
        loaded = load_model(entry, Path(args.cache_dir) if args.cache_dir else None)
        engine = (EmbedEngine if entry.task == "embed" else Engine).from_loaded(loaded, entry)
        if os.environ.get(faults.ENV):
            log.warning("test fault injection is on: %s", os.environ[faults.ENV])
            engine.fault_hook = faults.fault_hook(os.environ[faults.ENV])
    except Exception as exc:
        log.exception("could not start the model")
        transport.send(sock, WorkerError(f"{type(exc).__name__}: {exc}"))
        return 1
    try:
        serve(sock, engine, args.heartbeat_seconds, ThreadGovernor() if entry.threads is None else None)
    except (BrokenPipeError, ConnectionResetError):
        log.info("the API process went away; exiting")
    return 0


def exit_now(code: int) -> None:
    """Leave without the interpreter's finalization. Daemon threads (the socket reader, the heartbeat, the grammar
    compiler) can be inside native code then, and C++'s runtime aborts the process when finalization unwinds such a
    thread (seen: 'terminate called without an active exception', exit -6, after a clean shutdown). Nothing is
    left to tidy once `main` returns: the socket is closed, the caches are memory; the logs are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
