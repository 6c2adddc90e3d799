"""Peer adapters, in table order."""

from __future__ import annotations

from benchmarks.adapters.base import Options, Peer
from benchmarks.adapters.fasterfifo_peer import FasterFifoPeer
from benchmarks.adapters.iceoryx2_peer import Iceoryx2Peer
from benchmarks.adapters.mpqueue_peer import MpQueuePeer
from benchmarks.adapters.redis_peer import RedisPeer
from benchmarks.adapters.shmcast_peer import ShmcastPeer
from benchmarks.adapters.shmcomm_peer import ShmCommPeer
from benchmarks.adapters.zmq_peer import ZmqPeer

PEERS: list[type[Peer]] = [
    ShmcastPeer,
    MpQueuePeer,
    FasterFifoPeer,
    ZmqPeer,
    RedisPeer,
    Iceoryx2Peer,
    ShmCommPeer,
]
BY_NAME = {p.name: p for p in PEERS}

__all__ = ["BY_NAME", "PEERS", "Options", "Peer"]
