"""Composition root and lifecycle of `mta serve`.

Builds every component from the Config (each gets only its section), starts the listeners, the
scheduler and the background tasks, and drains on SIGTERM/SIGINT: stop accepting, let in-flight
attempts finish (or leave their mail queued), release the spool lock, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mta import log, metrics, runtime
from mta.config import Config, parse_hostport
from mta.delivery.attempt import AttemptContext
from mta.delivery.pool import ConnectionPool
from mta.delivery.smtp_client import BindAddresses, Timeouts
from mta.delivery.unreachable import UnreachableHosts
from mta.delivery.worker import Worker
from mta.errors import SpoolError
from mta.net.dns import Resolver
from mta.resume import Resume
from mta.scheduler import Scheduler
from mta.spool.recovery import before_listening
from mta.spool.state import MessageMeta
from mta.spool.store import SpoolStore
from mta.submission.listener import Listeners, build_listeners

if TYPE_CHECKING:
    from mta.cluster.db import ClusterDb
    from mta.sts.cache import PolicyStore

_log = logging.getLogger("mta.app")
DRAIN_TIMEOUT = 20.0
STARTED_GRACE = 5.0  # seconds the "started" event waits for the background scan (not the listeners)
STOP_GRACE = 1.0  # seconds a child's exit waits for our own stop signal (group-wide SIGTERM)


def build_resolver(cfg: Config) -> Resolver:
    return Resolver(nameservers=cfg.dns.nameservers, port=cfg.dns.port, timeout=cfg.dns.timeout,
                    dnssec=cfg.dns.dnssec)


def build_cluster(cfg: Config) -> ClusterDb | None:
    """The shared PostgreSQL of `[cluster] database`, or None: one node on SQLite (issue 15)."""
    if not cfg.cluster.database:
        return None
    from mta.cluster import node_name
    from mta.cluster.db import ClusterDb

    return ClusterDb(cfg.cluster.database, node_name(cfg.cluster), on_state=metrics.cluster_database)


def build_policy_store(cfg: Config, cluster: ClusterDb | None) -> PolicyStore:
    """The one choice of policy cache (ARCHITECTURE.md "State stores"): SQLite file or PostgreSQL."""
    if cluster is not None:
        from mta.cluster.policies import PgPolicyCache

        return PgPolicyCache(cluster)
    from mta.sts.cache import PolicyCache

    Path(cfg.mta_sts.cache_path).parent.mkdir(parents=True, exist_ok=True)
    return PolicyCache(cfg.mta_sts.cache_path)


def build_sts(cfg: Config, resolver: Resolver, cluster: ClusterDb | None = None) -> object | None:
    """The MTA-STS service, or None when `[mta_sts] enabled = false`."""
    if not cfg.mta_sts.enabled:
        return None
    from mta.sts.service import StsService

    overrides: dict[str, object] = {}
    for domain, value in cfg.mta_sts.overrides.items():
        if value in ("none",):
            overrides[domain.lower()] = "none"
        else:
            from mta.sts.policy import parse_policy

            # config.py accepts only "none" or a whole policy text (issue 10 item 9 decision).
            overrides[domain.lower()] = parse_policy(value.encode("utf-8", "surrogateescape"))
    return StsService(resolver=resolver, cache=build_policy_store(cfg, cluster), https_port=cfg.mta_sts.https_port,
                      ca_file=cfg.tls.ca_file or None, fetch_timeout=cfg.mta_sts.fetch_timeout,
                      draft03_compat=cfg.mta_sts.draft03_compat, overrides=overrides)  # type: ignore[arg-type]


def build_timeouts(cfg: Config) -> Timeouts:
    d = cfg.delivery
    return Timeouts(connect=d.connect_timeout, greeting=d.command_timeout, ehlo=d.command_timeout,
                    mail=d.command_timeout, rcpt=d.command_timeout, data_init=d.command_timeout,
                    data_block=d.data_timeout, data_final=d.data_timeout)


MARK_INTERVAL = 0.1  # seconds between flushes of the journal's finished-message marks


class Relay:
    """One running relay: listeners + spool + scheduler + workers."""

    def __init__(self, cfg: Config, store: SpoolStore | None = None) -> None:
        self.cfg = cfg
        self.store = store or SpoolStore(cfg.queue.path)
        self.stop_event = asyncio.Event()
        self.resolver = build_resolver(cfg)
        self.cluster = build_cluster(cfg)
        self.sts = build_sts(cfg, self.resolver, self.cluster)
        self.pool = ConnectionPool(cfg.delivery.connection_reuse_time, max_per_key=cfg.delivery.per_domain_concurrency)
        relay_auth = None
        if cfg.delivery.relayhost_username:
            secret = Path(cfg.delivery.relayhost_password_file).read_text().strip()
            relay_auth = (cfg.delivery.relayhost_username, secret)
        self.recorder = self._build_recorder()
        unreachable = UnreachableHosts(cfg.delivery.unreachable_time)  # SMTP-37
        self.ctx = AttemptContext(
            hostname=cfg.hostname, resolver=self.resolver, pool=self.pool, timeouts=build_timeouts(cfg),
            smtp_port=cfg.delivery.smtp_port, ipv6=cfg.delivery.ipv6, ca_file=cfg.tls.ca_file or None,
            sts=self.sts, recorder=metrics.CountingRecorder(self.recorder),
            relayhost=parse_hostport(cfg.delivery.relayhost) if cfg.delivery.relayhost else None,
            relayhost_tls=cfg.delivery.relayhost_tls, relayhost_auth=relay_auth, rng=random.Random(),
            dane=cfg.dane.enabled and cfg.dns.dnssec,
            bind=BindAddresses(cfg.delivery.bind_address, cfg.delivery.bind_address6),
            unreachable=unreachable,
        )
        self.worker = Worker(self.store, self.ctx, cfg.delivery, on_new_message=self.on_new_message)
        self.scheduler = Scheduler(self.store, self.worker.deliver, cfg.delivery.concurrency,
                                   on_flush=unreachable.clear)
        self.listeners: Listeners | None = None  # only when the listeners run in this process
        self.scheduler_task: asyncio.Task[None] | None = None
        self.http: object | None = None  # the operations endpoint (mta.http), when [http] listen is set
        self._background: list[asyncio.Task[None]] = []
        self.child_pid: int | None = None  # the first submission child (any of them gone: child_gone)
        self.child_pids: list[int] = []
        self.child_tasks: list[asyncio.Task[None]] = []
        self.child_gone = asyncio.Event()  # set when the relay must stop with status 1
        self.stop_requested = asyncio.Event()  # SIGTERM/SIGINT reached us (set by serve's handlers)
        self.failed = False
        self.resume: Resume | None = None

    def _build_recorder(self) -> object:
        from mta.delivery.attempt import NullRecorder

        if not self.cfg.tlsrpt.enabled:
            return NullRecorder()
        if self.cluster is not None:
            from mta.cluster.tlsrpt import PgResultStore

            return PgResultStore(self.cluster, sending_ip="127.0.0.1",
                                 record_all_sessions=self.cfg.tlsrpt.record_all_sessions)
        from mta.tlsrpt.store import ResultStore

        # Each session records its own local address (getsockname, issue 10 item 11); this default
        # only serves records without a connection (discovery failures, MX outside the policy).
        return ResultStore(self.cfg.tlsrpt.db_path, sending_ip=self.cfg.delivery.bind_address or None,
                           record_all_sessions=self.cfg.tlsrpt.record_all_sessions)

    def on_new_message(self, meta: MessageMeta) -> None:
        due = meta.next_due()
        if due is not None:
            self.scheduler.add_new(meta.id, due)

    async def start(self, child: list[tuple[int, int]] | None = None, prepared: bool = False) -> None:
        """Start serving, then read the spool in the background (PERF-4); `child` = [(pid, pipe)] of the
        submission processes, which must only have been started after `recovery.before_listening`
        (`prepared`): that removes half-written files, and would remove the child's if it were
        already accepting mail."""
        if self.store._lock_fd is None:
            self.store.lock()
        if self.cluster is not None:
            # Bounded: a database that is down or slow is logged and retried in the background
            # (CLU-5); only a schema from a newer mta stops the start (SchemaTooNew, one line).
            await self._start_cluster()
        if not prepared:
            await asyncio.to_thread(before_listening, self.store)
        # Before any listener or ctl/ request can schedule a message: from here on the scheduler
        # tells the scan's reports from the live side's (mta.scheduler, module rule).
        self.scheduler.begin_scan()
        resume = self.resume = Resume(self.store, self.scheduler)
        self._background.append(asyncio.get_running_loop().create_task(self._resume()))
        loop = asyncio.get_running_loop()
        if child is None:
            self.listeners = build_listeners(self.cfg, self.store, self.on_new_message)
            await self.listeners.start()
            listen = " ".join(f"{h}:{p}" for h, p in self.listeners.addresses())
        else:
            listen = await self._attach(child)
        self.scheduler_task = loop.create_task(self.scheduler.run(self.stop_event))
        self._background.append(self.scheduler_task)
        self._background.append(loop.create_task(self._sweep_pool()))
        if child is not None and self.cfg.queue.group_commit:
            self._background.append(loop.create_task(self._journal_upkeep(self.store.book.flush_marks, MARK_INTERVAL)))
            self._background.append(loop.create_task(self._journal_upkeep(self.store.book.checkpoint_due, 1.0)))
        if self.sts is not None and hasattr(self.sts, "refresh_loop"):
            self._background.append(loop.create_task(self.sts.refresh_loop(
                self.stop_event, interval=self.cfg.mta_sts.refresh_interval)))
        if hasattr(self.recorder, "flush_loop"):
            self._background.append(loop.create_task(self.recorder.flush_loop(self.stop_event)))
        if self.cfg.tlsrpt.enabled:
            from mta.tlsrpt.sender import daily_loop

            self._background.append(loop.create_task(daily_loop(self, self.stop_event)))
        if self.cfg.http.listen:
            from mta.http import relay_ops, server

            self.http = await server.start(relay_ops.build_ops(self), self.cfg.http)
        # "started" carries the whole queue when the scan is quick (small spools); otherwise it says
        # the scan is still running and a "resume" event reports its end.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(resume.done.wait(), STARTED_GRACE)
        seconds = resume.seconds
        log.event("started", listen=listen, queued=self.scheduler.queued,
                  resume="finished" if seconds is not None else "running",
                  resume_seconds=None if seconds is None else round(seconds, 2),
                  submission_pid=child[0][0] if child else None,
                  **({"submission_pids": [pid for pid, _ in child]} if child and len(child) > 1 else {}))

    async def _resume(self) -> None:
        assert self.resume is not None
        await self.resume.run()
        # A group-wide signal during start-up can reach the scan before it left our process group
        # (it starts its own session): stopping then is the signal's doing, not the scan's.
        if not self.resume.ok and not self.stop_event.is_set() and not await self._stop_follows():
            # Unread parts of the spool would wait for the next start: stop (exit 1) so that a
            # supervisor restarts us at once; the spool is intact.
            self.failed = True
            self.child_gone.set()

    async def _start_cluster(self) -> None:
        assert self.cluster is not None
        from mta.cluster.db import ClusterError
        from mta.cluster.nodes import heartbeat_loop
        from mta.cluster.policies import PgPolicyCache

        if await self.cluster.start():
            cache = getattr(self.sts, "cache", None)
            if isinstance(cache, PgPolicyCache):
                with contextlib.suppress(ClusterError):
                    await cache.sync_once(full=True)  # policies stored by the other nodes apply from the start
        loop = asyncio.get_running_loop()
        cache = getattr(self.sts, "cache", None)
        if isinstance(cache, PgPolicyCache):
            self._background.append(loop.create_task(cache.run(self.stop_event)))
        self._background.append(loop.create_task(heartbeat_loop(
            self.cluster, self.queue_summary, time.time(), self.cfg.cluster.heartbeat_interval, self.stop_event)))

    def queue_summary(self) -> dict[str, object]:
        """This node's queue for the cluster node table: the same figures as the queue gauges."""
        states, oldest_age = self.scheduler.queue_state(time.time(), metrics.queue_gauges)
        oldest = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - oldest_age)) if oldest_age else None
        return {"queued": sum(states.values()), **states, "oldest": oldest, "oldest_age": round(oldest_age, 1)}

    async def _attach(self, children: list[tuple[int, int]]) -> str:
        """Follow every submission child's pipe; returns their listen addresses once all are ready
        (they share them: one child, or several on the same SO_REUSEPORT ports, PERF-5)."""
        from mta.submission.process import read_notifications

        loop = asyncio.get_running_loop()
        self.child_pid = children[0][0]
        self.child_pids = [pid for pid, _ in children]

        def on_id(line: str) -> None:
            qid, _, segment = line.partition(" ")
            if segment:
                self.store.book.note(qid, segment)  # before scheduling: a fast delivery marks it done
            self.scheduler.add_new(qid, time.time())

        async def follow(pid: int, fd: int, ready: asyncio.Future[str]) -> None:
            def on_ready(addresses: str) -> None:
                if not ready.done():
                    ready.set_result(addresses)

            await read_notifications(fd, on_id, on_ready)
            if not ready.done():
                ready.set_exception(SpoolError("the submission process failed to start"))
            elif not self.stop_event.is_set() and not await self._stop_follows():
                # A listener is gone: stop (exit 1) so a supervisor restarts us; the spool is intact.
                _log.error("submission process exited unexpectedly; stopping (pid %d)", pid)
                self.failed = True
                self.child_gone.set()

        readies: list[asyncio.Future[str]] = []
        for pid, fd in children:
            readies.append(loop.create_future())
            self.child_tasks.append(loop.create_task(follow(pid, fd, readies[-1])))
        return (await asyncio.gather(*readies))[0]

    async def _stop_follows(self) -> bool:
        """True when a stop signal reaches us within STOP_GRACE of a child's exit. A signal sent to
        the whole group (systemd's default KillMode, `kill -- -PGID`, `timeout`) stops the child
        too, and its closed pipe can be read before our own handler has run: that is a stop, not
        a crash (exit 0, nothing logged as an error)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_requested.wait(), STOP_GRACE)
        return self.stop_requested.is_set()

    async def _sweep_pool(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=max(1.0, self.pool.max_idle_time))
            await self.pool.sweep()

    async def _journal_upkeep(self, step: Callable[[], object], interval: float) -> None:
        """Run one of the journal's chores (mta/spool/journal.py) every `interval` seconds in a thread.
        Two loops, so a slow checkpoint never delays the marks' flush (which bounds the duplicate
        deliveries a power cut can cause to those finished in the last MARK_INTERVAL)."""
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=interval)
            try:
                await asyncio.to_thread(step)
            except OSError as exc:  # the segments stay, and so does every message: retried next time
                _log.error("spool: journal upkeep failed: %s", exc)

    async def stop(self) -> None:
        log.event("stopping", queued=self.scheduler.queued)
        self.stop_event.set()
        if self.child_pids:
            from mta.submission.process import stop_child

            await asyncio.gather(*(stop_child(pid) for pid in self.child_pids))
            await asyncio.gather(*self.child_tasks, return_exceptions=True)
        if self.listeners is not None:
            await self.listeners.stop()
        await self.scheduler.drain(DRAIN_TIMEOUT)
        if self.child_pid is not None:
            # The child is gone: every segment is final. Leave none behind for the next start.
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.store.book.checkpoint_all)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.pool.close_all()
        if hasattr(self.recorder, "close"):
            await self.recorder.close()
        if self.sts is not None and hasattr(self.sts, "close"):
            await self.sts.close()
        if self.cluster is not None:
            cache = getattr(self.sts, "cache", None)
            if cache is not None:
                await cache.close()  # last dirty policies, if the database answers
            await self.cluster.close()
        if self.http is not None:  # last: /readyz answers 503 "stopping" while we drain
            await self.http.cleanup()  # type: ignore[attr-defined]
        self.store.unlock()


async def serve(cfg: Config, store: SpoolStore | None = None, child: list[tuple[int, int]] | None = None,
                prepared: bool = False) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until the submission child dies (exit 1)."""
    loop = asyncio.get_running_loop()
    runtime.use_io_threads(loop)
    metrics.set_enabled(bool(cfg.http.listen))
    if store is None:
        # The spool first: an unusable one is the error the operator must see, before anything (the
        # MTA-STS cache, say, which lives in it by default) trips over it less clearly.
        SpoolStore(cfg.queue.path).prepare()
    relay = Relay(cfg, store)
    # Handlers before start-up, not after: the listener child already accepts clients, and a
    # SIGTERM arriving meanwhile must still mean "stop cleanly". As a container's PID 1 a signal
    # without a handler is not even fatal, it is ignored: `docker stop` then hangs until SIGKILL.
    stop = relay.stop_requested
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if runtime.early_stop_requested():  # a SIGTERM before this loop existed (runtime.catch_early_stop)
        stop.set()
    await relay.start(child, prepared)
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(relay.child_gone.wait())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    await relay.stop()
    return 1 if relay.failed else 0
