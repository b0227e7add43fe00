"""Read leases (Linux): a large file read by path where it lies, with proof that no one wrote to it meanwhile.

A framework that opens its file only by path (Keras) is given `/proc/self/fd/N` of the handle that was
hashed: the very inode. What could still change its bytes is a write, and writing to a file takes
opening it for writing (`write`, a shared writable mapping, `fallocate`, `truncate` by path all do).
A read lease (`fcntl(F_SETLEASE, F_RDLCK)`) is refused while any process has the file open for
writing, and any later open for writing or truncation breaks it: the opener waits until the lease is
released (at most /proc/sys/fs/lease-break-time, 45 s by default), and from the moment it asks the
lease reads as broken. So a lease still held once the framework has read the file proves that what it
read is what was hashed; a broken one makes the core load again from a sealed copy (`_checked`).
Leases need a local filesystem, a file the process owns (or CAP_LEASE), and `fs.leases-enable`;
where one cannot be had, the caller copies instead.
"""

from __future__ import annotations

import sys


def take(fd: int) -> bool:
    """Take a read lease on the file open read-only at `fd`; False if none can be had here."""
    if sys.platform != "linux":
        return False
    import fcntl
    import signal  # here: `import mlpersist` need not pay for its enums

    try:
        # a lease being broken signals its holder, with SIGIO by default, whose default action ends the
        # process: for the instant between taking the lease and forgetting its owner the signal is
        # SIGURG (ignored unless a handler is set), then there is no owner to signal at all
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # open for writing somewhere (EAGAIN), not ours (EACCES), no leases on this filesystem
        return False
    fcntl.fcntl(fd, fcntl.F_SETOWN, 0)
    return True


def held(fd: int) -> bool:
    """Whether the read lease taken on `fd` is still unbroken (no one has asked to write since)."""
    import fcntl

    try:
        return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
    except OSError:
        return False
