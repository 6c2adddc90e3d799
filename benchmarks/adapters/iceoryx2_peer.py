"""iceoryx2 (Python package): publish-subscribe of byte slices plus an event
service whose notifier wakes subscribers blocked on a listener.

The service overflows safely (a full subscriber buffer loses its oldest sample),
each subscriber's buffer holds *depth* samples.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
from typing import Any

from benchmarks import _codec
from benchmarks.adapters.base import Peer, wait_until

_seq = itertools.count()


def _node() -> Any:
    import iceoryx2 as iox2

    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
    # The harness SIGSTOPs and SIGCONTs subscribers: keep iceoryx2 from treating
    # signals as termination requests.
    return (
        iox2.NodeBuilder.new()
        .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
        .create(iox2.ServiceType.Ipc)
    )


class Iceoryx2Peer(Peer):
    name = "iceoryx2"
    module = "iceoryx2_peer"
    semantics = (
        "shared-memory pub/sub + event service; a full subscriber buffer overwrites its oldest"
        " sample"
    )

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import iceoryx2  # noqa: F401
        except ImportError as exc:
            return f"iceoryx2 not installed ({exc})"
        return None

    def __init__(self, opts: Any) -> None:
        super().__init__(opts)
        self.node = _node()

    def channel(self, n: int, max_bytes: int, depth: int) -> _Channel:
        return _Channel(
            self.node,
            f"shmcast-bench/{os.getpid()}/{next(_seq)}",
            n,
            max_bytes,
            depth,
            self.opts.json,
        )

    def close(self) -> None:
        node, self.node = self.__dict__.pop("node", None), None
        if node is not None:
            # Subscribers that were SIGKILLed leave their node behind.
            with contextlib.suppress(Exception):
                node.try_cleanup_dead_nodes()


class _Channel:
    def __init__(
        self, node: Any, name: str, n: int, max_bytes: int, depth: int, json_impl: str
    ) -> None:
        import iceoryx2 as iox2

        self.name = name
        self.depth = depth
        sname = iox2.ServiceName.new(name)
        self.service = (
            node.service_builder(sname)
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .max_publishers(1)
            .max_subscribers(n + 1)
            .max_nodes(n + 2)
            .subscriber_max_buffer_size(depth)
            .history_size(0)
            .enable_safe_overflow(True)
            .create()
        )
        self.publisher = (
            self.service.publisher_builder()
            .initial_max_slice_len(max_bytes + 64)
            .allocation_strategy(iox2.AllocationStrategy.PowerOfTwo)
            .create()
        )
        self.event = (
            node.service_builder(sname)
            .event()
            .max_listeners(n + 1)
            .max_notifiers(1)
            .max_nodes(n + 2)
            .create()
        )
        self.notifier = self.event.notifier_builder().create()
        self._loan = self.publisher.loan_slice_uninit
        self._notify = self.notifier.notify
        self._dumps = _codec.get(json_impl)[0]

    def spec(self, index: int) -> Any:
        return (self.name, self.depth)

    def wait_ready(self, n: int, deadline: float) -> None:
        wait_until(
            lambda: self.service.dynamic_config.number_of_subscribers >= n,
            deadline,
            "iceoryx2 subscribers",
        )
        self.publisher.update_connections()

    def publish(self, obj: Any) -> None:
        data = self._dumps(obj)
        sample = self._loan(len(data))
        ctypes.memmove(sample.payload_ptr, data, len(data))
        sample.assume_init().send()
        self._notify()

    def close(self) -> None:
        for attr in ("notifier", "publisher"):
            port = self.__dict__.pop(attr, None)
            if port is not None:
                port.delete()
        self.event = self.service = None


class _Receiver:
    def __init__(self, spec: Any) -> None:
        import iceoryx2 as iox2

        name, depth = spec
        self.node = _node()
        sname = iox2.ServiceName.new(name)
        self.service = (
            self.node.service_builder(sname).publish_subscribe(iox2.Slice[ctypes.c_uint8]).open()
        )
        self.sub = self.service.subscriber_builder().buffer_size(depth).create()
        self.event = self.node.service_builder(sname).event().open()
        self.listener = self.event.listener_builder().create()
        self._receive = self.sub.receive
        self._wait = self.listener.timed_wait
        self._duration = iox2.Duration.from_secs_f64
        self._wait_error = iox2.ListenerWaitError
        self._loads = _codec.get()[1]

    def _take(self) -> Any:
        sample = self._receive()
        if sample is None:
            return None
        data = ctypes.string_at(sample.payload_ptr, sample.header.number_of_elements)
        sample.delete()
        return self._loads(data)

    def recv(self, timeout: float) -> Any:
        obj = self._take()
        if obj is None:
            try:  # noqa: SIM105 - hot path
                self._wait(self._duration(timeout))
            except self._wait_error:  # a signal (SIGCONT after SIGSTOP) cut the wait short
                pass
            obj = self._take()
        return obj

    def close(self) -> None:
        self.listener.delete()
        self.sub.delete()
        self.event = self.service = self.node = None


def open_receiver(spec: Any) -> _Receiver:
    return _Receiver(spec)


__all__ = ["Iceoryx2Peer", "open_receiver"]
