"""Submission in its own process, so accepting mail and delivering it use both cores.

Rule: the child runs only the listeners and the spool's `put`; everything else (scheduler,
delivery, MTA-STS, TLS-RPT, operator requests, the spool lock) stays in the parent. After each
`250` the child writes the queue id as one line on a pipe; the parent schedules it. A message
whose line is lost (the child died between the fsync and the write) is still in the spool and
is found by the start-up scan, so nothing acknowledged is lost.

The child dies with the parent (PR_SET_PDEATHSIG, and a getppid() check as a fallback): a
SIGKILLed `mta serve` never leaves a listener behind that a restarted one would fight with.

`[submission] processes = N` forks N such children on one set of ports (PERF-5, see
mta.submission.sockets); each has its own pipe, the parent follows them all, and the death of any
one stops the relay (exit 1) just as with one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable

from mta import log, metrics, runtime
from mta.config import Config
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore
from mta.submission.caps import SharedCounts
from mta.submission.listener import build_listeners
from mta.submission.sockets import bind_shared

READY = "READY"
_PR_SET_PDEATHSIG = 1


def spawn(cfg: Config, close_fds: tuple[int, ...] = (), socks: list[socket.socket] | None = None,
          close_socks: tuple[socket.socket, ...] = (), shared: SharedCounts | None = None) -> tuple[int, int]:
    """Fork one submission child; returns (pid, read end of its notification pipe). `socks`: its
    already bound listening sockets (several processes, mta.submission.sockets); `close_fds` and
    `close_socks`: what the parent holds that the child must not (the spool lock, the other
    children's pipes and sockets: a socket kept open by a child that never accepts on it would
    take its share of new connections and never answer them)."""
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 1
        runtime.forget_early_stop()
        try:
            os.close(read_fd)
            for fd in close_fds:
                os.close(fd)  # e.g. the spool lock: the parent alone holds it
            for sock in close_socks:
                sock.close()
            _die_with(parent)
            SpoolStore(cfg.queue.path).hold_writer_lock()  # released only by our exit
            code = runtime.run(_child(cfg, write_fd, parent, socks, shared))
        except BaseException:
            traceback.print_exc()
        finally:
            log.drain()  # the log writer thread's queue dies with os._exit
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd


def spawn_all(cfg: Config, lock_fd: int) -> list[tuple[int, int]]:
    """Fork `[submission] processes` children; [(pid, pipe)]. With more than one they share each
    listen address through SO_REUSEPORT sockets bound here, before any fork (PERF-5)."""
    count = cfg.submission.processes
    if count == 1:
        return [spawn(cfg, close_fds=(lock_fd,))]
    per_child = bind_shared(cfg.submission, count)
    # The caps bound the whole relay: the children count connections in one shared table rather
    # than each taking 1/N of a cap, which the kernel's uneven spread made refuse early (caps.py).
    counts = SharedCounts(count)
    children: list[tuple[int, int]] = []
    try:
        for i, socks in enumerate(per_child):
            others = tuple(s for j, group in enumerate(per_child) if j != i for s in group)
            children.append(spawn(cfg, close_fds=(lock_fd, *(fd for _, fd in children)), socks=socks,
                                  close_socks=others, shared=counts.for_row(i)))
    finally:
        for group in per_child:  # the children have their own copies
            for sock in group:
                sock.close()
    return children


def _die_with(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


async def _child(cfg: Config, write_fd: int, parent: int, socks: list[socket.socket] | None = None,
                 shared: SharedCounts | None = None) -> int:
    loop = asyncio.get_running_loop()
    runtime.use_io_threads(loop)
    transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(write_fd, "wb", buffering=0))
    # Our counts go to the parent, which alone exports them (mta.metrics); a message's counts are
    # written before its id, so the parent never schedules mail it has not counted yet.
    metrics.set_enabled(bool(cfg.http.listen))
    metrics.forward_to(lambda line: transport.write(line.encode()))

    store = SpoolStore(cfg.queue.path)
    if cfg.queue.group_commit:
        # Our own journal segments (issue 18): named by pid and start time, unique across restarts.
        store.open_journal(f"{os.getpid()}-{int(time.time() * 1000):x}")

    lines: list[str] = []

    def send_lines() -> None:
        metrics.flush_forwarded()  # the batch's counts before its ids (see above)
        transport.write("".join(lines).encode())
        lines.clear()

    def accepted(meta: MessageMeta) -> None:
        # "<id> <journal segment>": the parent marks the segment's .done file when the message is
        # finished, so a replay after a crash does not bring it back. The lines of one loop turn
        # go in one write: a group flush acknowledges a batch at once (one wake-up of the parent,
        # not one per message). A line lost with us is no loss: the start-up scan finds its mail.
        if not lines:
            loop.call_soon(send_lines)
        lines.append(f"{meta.id} {store.segment_of.pop(meta.id, '')}\n")

    listeners = build_listeners(cfg, store, accepted, shared)
    for attempt in range(50):
        try:
            await listeners.start(socks)
            break
        except OSError as exc:
            # A previous child may still be letting go of the port for a moment after a crash.
            if exc.errno != errno.EADDRINUSE or attempt == 49:
                print(f"mta: cannot listen: {exc.strerror or exc}", file=sys.stderr)
                return 1
            await listeners.stop()
            await asyncio.sleep(0.1)
    addresses = " ".join(f"{h}:{p}" for h, p in listeners.addresses())
    transport.write(f"{READY} {addresses}\n".encode())
    stop = asyncio.Event()
    # Ctrl-C reaches the whole process group: only the parent acts on it (and SIGTERMs us after
    # it stopped expecting ids); if we stopped on our own it would take us for crashed.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set() and os.getppid() == parent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        if store.journal is not None:
            store.journal.tick()  # seal an idle segment so the parent can checkpoint it
    await listeners.stop()
    if store.journal is not None:
        store.journal.close()
    transport.close()
    return 0


async def read_notifications(fd: int, on_id: Callable[[str], None], on_ready: Callable[[str], None],
                             on_metrics: Callable[[str], None] = metrics.apply_forwarded) -> None:
    """Parent side: call on_id for every accepted queue id until the child closes the pipe
    (lines starting with metrics.FORWARD_PREFIX carry the child's counts)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 16)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    while line := await reader.readline():
        text = line.decode("ascii", "replace").strip()
        if text.startswith(READY):
            on_ready(text[len(READY):].strip())
        elif text.startswith(metrics.FORWARD_PREFIX):
            on_metrics(text[len(metrics.FORWARD_PREFIX):])
        elif text:
            on_id(text)


async def stop_child(pid: int, timeout: float = 10.0) -> int:
    """SIGTERM the child, wait for it (SIGKILL after `timeout`); returns its exit status."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    return await wait_child(pid, timeout)


async def wait_child(pid: int, timeout: float | None = None) -> int:
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if done:
            return os.waitstatus_to_exitcode(status)
        if deadline is not None and loop.time() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = None
        await asyncio.sleep(0.05)
