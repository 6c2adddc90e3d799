"""The only module that talks to the OS: shared-memory segments, semaphores and OFD locks.

Segments are ``posix_ipc.SharedMemory`` objects mapped with ``mmap`` rather than
``multiprocessing.shared_memory.SharedMemory``: before Python 3.13 the latter
registers every attach with the resource tracker, which unlinks the segment
when the attaching process exits (CPython gh-82300), and it always creates
segments with mode 0600. Neither happens here.

Liveness rests on open-file-description (OFD) locks on the control segment:
the kernel releases them when their holder dies, however it dies, and they do
not depend on pids, which the kernel reuses. (iceoryx2 detects dead nodes the
same way.) A semaphore, by contrast, stays taken forever when its holder dies,
so no process ever blocks on a semaphore another process could hold.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import platform
import stat as stat_mod
import struct
import sys
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Protocol

import posix_ipc

from ._errors import ShmcastError

# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid, padded to 32 bytes.
_FLOCK = struct.Struct("hhqqi4x")

# Lock bytes of the control segment (locks may lie beyond the end of a file).
PUBLISHER_LOCK = 0  # held by the publisher for the bus's life
REGISTRY_LOCK = 1  # held briefly by whoever changes the registry epoch
RECLAIM_LOCK = 2  # held while deciding to unlink a dead bus
ENTRY_LOCK_BASE = 1024  # + entry index: held by the subscriber owning that entry
# + publisher place index: held by the Publisher in that place. Above every
# subscriber lock (ENTRY_LOCK_BASE + MAX_SUBSCRIBERS = 2048).
PLACE_LOCK_BASE = 4096


class Segment:
    """One mapped shared-memory segment and the open fd its locks live on."""

    __slots__ = ("__weakref__", "_mmap", "buf", "closed", "fd", "name", "size")

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self.closed = False
        # An empty file cannot be mapped; it only happens to a creator killed
        # before sizing its segment, which is then reclaimed without reading it.
        self._mmap = _map(fd, size) if size else None
        self.buf = memoryview(self._mmap if self._mmap is not None else b"")
        track_fork(self)

    @classmethod
    def create(cls, name: str, size: int, mode: int) -> Segment:
        """Create a new segment of *size* bytes; ``FileExistsError`` if the name is taken.

        :raises ShmcastError: if /dev/shm cannot hold it.
        """
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=size)
        except posix_ipc.ExistentialError as e:
            raise FileExistsError(errno.EEXIST, str(e), name) from None
        except posix_ipc.PermissionsError as e:
            raise PermissionError(errno.EACCES, str(e), name) from None
        fd = shm.fd
        try:
            os.fchmod(fd, mode)  # umask applied to shm_open's mode
            # Reserve the pages now: on a full /dev/shm this fails with ENOSPC,
            # where touching an unreserved page later would kill us with SIGBUS.
            os.posix_fallocate(fd, 0, size)
            return cls(name, fd, size)
        except OSError as e:
            os.close(fd)
            unlink_segment(name)
            raise ShmcastError(f"cannot create {size}-byte segment {name!r}: {e}") from e

    @classmethod
    def open(cls, name: str, min_size: int = 1, *, max_size: int | None = None) -> Segment:
        """Map an existing segment; ``FileNotFoundError`` if there is none.

        :param max_size: map at most this many bytes, whatever the file's size
            (a file grown by ``ftruncate`` costs nothing on tmpfs, a huge map does).
        :raises ShmcastError: if it is smaller than *min_size*.
        """
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(errno.ENOENT, "no such shared memory segment", name) from None
        except posix_ipc.PermissionsError as e:
            raise PermissionError(errno.EACCES, str(e), name) from None
        fd = shm.fd
        try:
            size = os.fstat(fd).st_size
            if size < min_size:
                raise ShmcastError(
                    f"segment {name!r} is {size} bytes, too small to be what it claims to be"
                )
            return cls(name, fd, size if max_size is None else min(size, max_size))
        except BaseException:
            os.close(fd)
            raise

    def owner(self) -> int:
        """The uid that owns the segment's file."""
        return os.fstat(self.fd).st_uid

    def drop_fd(self) -> None:
        """Close the fd but keep the mapping: a writer of a ring needs no lock, and
        every fd it keeps counts against ``RLIMIT_NOFILE`` (one per subscriber)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def still_named(self) -> bool:
        """Whether our segment is still the one its name resolves to."""
        try:
            st = os.stat("/dev/shm" + self.name)
        except FileNotFoundError:
            return False
        mine = os.fstat(self.fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        """Unmap and close the fd (which drops every lock taken through it). Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.drop_fd()
        self.buf.release()
        # If a view of the map is still alive somewhere, the unmap happens when it goes.
        if self._mmap is not None:
            with contextlib.suppress(BufferError):
                self._mmap.close()

    def after_fork_in_child(self) -> None:
        """Close the child's copy of the fd.

        A forked child shares our open file description, and with it our OFD
        locks: closing its copy lets the locks die with the parent, as they must.
        """
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _map(fd: int, size: int) -> mmap.mmap:
    """Map *fd*'s file through an open file description of its own.

    A mapping keeps a reference to the open file description it was made
    from (and ``mmap.mmap`` also keeps a dup of the fd), so mapping the locked
    description itself would keep our OFD locks alive in every forked child,
    the publisher's included, after we die. A fresh open of the same file,
    which never holds a lock, avoids that.
    """
    map_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        if sys.version_info >= (3, 13):
            return mmap.mmap(map_fd, size, trackfd=False)
        return mmap.mmap(map_fd, size)
    finally:
        os.close(map_fd)


def unlink_segment(name: str) -> None:
    """Remove a segment's name if it exists and we may (another user's stays)."""
    with contextlib.suppress(posix_ipc.ExistentialError, posix_ipc.PermissionsError):
        posix_ipc.unlink_shared_memory(name)


def create_semaphore(name: str, mode: int) -> posix_ipc.Semaphore:
    """Create a wake semaphore with value 0 and exactly *mode* permission bits."""
    sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode, initial_value=0)
    with contextlib.suppress(OSError):
        os.chmod("/dev/shm/sem." + name.lstrip("/"), mode)
    return sem


def open_semaphore(name: str) -> posix_ipc.Semaphore:
    """Open an existing semaphore; ``FileNotFoundError`` if there is none."""
    try:
        return posix_ipc.Semaphore(name)
    except posix_ipc.ExistentialError:
        raise FileNotFoundError(errno.ENOENT, "no such semaphore", name) from None
    except posix_ipc.PermissionsError as e:
        raise PermissionError(errno.EACCES, str(e), name) from None


def unlink_semaphore(name: str) -> None:
    """Remove a semaphore's name if it exists and we may (another user's stays)."""
    with contextlib.suppress(posix_ipc.ExistentialError, posix_ipc.PermissionsError):
        posix_ipc.unlink_semaphore(name)


def wait(sem: posix_ipc.Semaphore, timeout: float) -> bool:
    """Take one unit of *sem* within *timeout* seconds (the GIL is released meanwhile)."""
    try:
        sem.acquire(timeout)
    except posix_ipc.BusyError:
        return False
    except posix_ipc.SignalError:
        return False  # EINTR: the caller re-checks and, if it must, waits again
    return True


def wake(sem: posix_ipc.Semaphore) -> None:
    """Post *sem* unless a wake-up is already pending there.

    Keeping the value at 0 or 1 means a busy subscriber is never woken in vain
    later, and the counter cannot reach SEM_VALUE_MAX however long it stays away.
    """
    if sem.value == 0:
        sem.release()


def _lock_op(fd: int, cmd: int, kind: int, byte: int) -> int:
    arg = _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)
    return int(_FLOCK.unpack(fcntl.fcntl(fd, cmd, arg))[0])


def try_lock(fd: int, byte: int) -> bool:
    """Take the exclusive OFD lock on *byte* of *fd*'s file without waiting."""
    try:
        _lock_op(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, byte)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def lock_within(fd: int, byte: int, timeout: float) -> bool:
    """Take the exclusive OFD lock on *byte*, waiting up to *timeout* seconds; whether we did.

    Only held for microseconds by others, and dropped by the kernel if they die,
    so a short back-off loop is enough; a holder stopped with SIGSTOP is the
    only way to reach the deadline.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0001
    while not try_lock(fd, byte):
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.01)
    return True


def lock(fd: int, byte: int, timeout: float, what: str) -> None:
    """Take the exclusive OFD lock on *byte*, waiting up to *timeout* seconds.

    :raises ShmcastError: on timeout.
    """
    if not lock_within(fd, byte, timeout):
        raise ShmcastError(f"timed out after {timeout} s waiting for the {what}")


def unlock(fd: int, byte: int) -> None:
    """Release our OFD lock on *byte*."""
    _lock_op(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, byte)


@contextlib.contextmanager
def locked(fd: int, byte: int, timeout: float, what: str) -> Iterator[None]:
    """Hold the OFD lock on *byte* for the block (see :func:`lock`).

    :raises ShmcastError: if it stays taken for *timeout* seconds.
    """
    lock(fd, byte, timeout, what)
    try:
        yield
    finally:
        unlock(fd, byte)


def is_locked(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on *byte*."""
    return _lock_op(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


# What tools need to look at buses from outside: read-only mappings, /dev/shm
# and /proc. Nothing below takes a lock or writes a byte.
SHM_DIR = "/dev/shm"


class ReadOnlySegment(Segment):
    """A segment opened ``O_RDONLY`` and mapped ``PROT_READ``: it can only be looked at.

    The OFD lock queries of :mod:`shmcast._registry` work on it (``F_OFD_GETLK``
    needs no write access); taking a lock does not, by design.
    """

    __slots__ = ()

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self.closed = False
        self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.buf = memoryview(self._mmap)

    def __enter__(self) -> ReadOnlySegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shm_path(posix_name: str) -> str:
    """The /dev/shm path of a POSIX shared-memory name: ``/shmcast.x`` -> ``/dev/shm/shmcast.x``."""
    return SHM_DIR + "/" + posix_name.lstrip("/")


def open_readonly(posix_name: str, min_size: int = 1) -> ReadOnlySegment:
    """Open and map an existing segment read-only.

    :raises FileNotFoundError: if there is no such segment.
    :raises PermissionError: if we may not read it.
    :raises ShmcastError: if it is not a regular file or smaller than *min_size*.
    """
    path = shm_path(posix_name)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise ShmcastError(f"{path}: not a shared-memory segment")
        if st.st_size < min_size:
            raise ShmcastError(
                f"{path}: not a shmcast segment: {st.st_size} bytes, at least {min_size} expected"
            )
        return ReadOnlySegment(posix_name, fd, st.st_size)
    except BaseException:
        os.close(fd)
        raise


def list_shm() -> list[str]:
    """The entries of /dev/shm (none if there is no /dev/shm)."""
    try:
        return os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []


def process_state(pid: int) -> str:
    """What /proc says of *pid*: ``running``, ``stopped``, ``zombie`` or ``gone``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            letter = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    if letter in (b"T", b"t"):
        return "stopped"
    if letter in (b"Z", b"X"):
        return "zombie"
    return "running"


def shm_users(paths: Iterable[str]) -> dict[str, set[int]]:
    """Which processes have each of *paths* (under /dev/shm) open or mapped.

    Reads ``/proc/PID/maps`` and ``/proc/PID/fd`` of every process we may read
    (all of them for root, our own otherwise).
    """
    wanted = set(paths)
    users: dict[str, set[int]] = {p: set() for p in wanted}
    if not wanted:
        return users
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return users
    for pid in pids:
        if pid == me:
            continue
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps", "rb") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    path = parts[5].rstrip(b"\n").decode(errors="replace")
                    if path in wanted:
                        users[path].add(pid)
        with contextlib.suppress(OSError):
            fd_dir = f"/proc/{pid}/fd"
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"{fd_dir}/{fd}")
                    if target in wanted:
                        users[target].add(pid)
    return users


# The pure-Python ring orders its stores and loads only by program order, which
# x86-64 keeps for other cores (total store order); aarch64 and ppc64le may not.
_STRONG_MEMORY = frozenset({"x86_64", "amd64"})
# The C core's release stores and acquire loads order them on these too (the
# ones its wheels are built for); every process decides by its own core.
_NATIVE_ORDERED = frozenset({"aarch64", "arm64"})


def check_memory_model(machine: str | None = None, native: bool | None = None) -> None:
    """Refuse to run the seqlock on a CPU whose memory model could tear events.

    :param native: whether this process's rings are the C core's (default: whether
        they are, see ``shmcast.native``).
    :raises ShmcastError: on anything but x86-64, or aarch64 with the C core.
    """
    machine = platform.machine() if machine is None else machine
    if native is None:
        from . import _ring  # lazily: the ring sits above this module

        native = bool(getattr(_ring, "NATIVE", False))
    if native and machine.lower() in _NATIVE_ORDERED:
        return
    if machine.lower() not in _STRONG_MEMORY:
        raise ShmcastError(
            f"shmcast's pure-Python rings rely on x86-64's memory ordering; this CPU is "
            f"{machine or 'unknown'}, on which a subscriber could accept a torn event, so "
            "shmcast refuses to create or attach a bus here"
        )


class _ForkAware(Protocol):
    def after_fork_in_child(self) -> None: ...


_live: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


def track_fork(obj: _ForkAware) -> None:
    """Call ``obj.after_fork_in_child()`` in the child of every later ``os.fork()``."""
    _live.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_live):
        obj.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = [
    "SHM_DIR",
    "ReadOnlySegment",
    "list_shm",
    "open_readonly",
    "process_state",
    "shm_path",
    "shm_users",
    "ENTRY_LOCK_BASE",
    "PLACE_LOCK_BASE",
    "check_memory_model",
    "lock_within",
    "locked",
    "PUBLISHER_LOCK",
    "RECLAIM_LOCK",
    "REGISTRY_LOCK",
    "Segment",
    "create_semaphore",
    "is_locked",
    "lock",
    "open_semaphore",
    "track_fork",
    "try_lock",
    "unlink_segment",
    "unlink_semaphore",
    "unlock",
    "wait",
    "wake",
]
