"""Free loopback ports for the servers that tests, benchmarks and the demo start, outside the ephemeral range.

A port found by binding port 0 comes from the kernel's ephemeral range, and
so does every port a server picks for itself while starting. Between our
choice and the server's bind, ``bentoml serve`` reserves its circus control
port the same way and once got ours (``ZMQError: Address already in use``
in a full test run). Below the ephemeral range the kernel never hands a port
out on its own, so only another explicit choice can collide, and that is
checked by binding.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
LOWEST = 10_000  # below this live well-known services
LINUX_EPHEMERAL_LOW = 32_768  # the Linux default; macOS and Windows start higher (49152)
RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_low() -> int:
    """The first port the kernel may assign on its own."""
    try:
        return min(int(RANGE_FILE.read_text().split()[0]), LINUX_EPHEMERAL_LOW)
    except (OSError, ValueError, IndexError):
        return LINUX_EPHEMERAL_LOW


def is_free(port: int, reuse_address: bool = False) -> bool:
    """Nothing bound to ``port`` on loopback (``reuse_address``: a socket lingering in TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(twin_offset: int = 0, taken: frozenset[int] = frozenset(), attempts: int = 500) -> int:
    """A free loopback port P below the ephemeral range (and P + ``twin_offset`` free too, when given)."""
    high = ephemeral_low() - twin_offset
    if high <= LOWEST:
        raise OSError(f"no loopback ports between {LOWEST} and the ephemeral range ({ephemeral_low()}) for offset {twin_offset}")
    picker = random.SystemRandom()
    for _ in range(attempts):
        port = picker.randrange(LOWEST, high)
        ports = {port, port + twin_offset}
        if not ports & taken and all(is_free(p) for p in ports):
            return port
    raise OSError(f"no free loopback port between {LOWEST} and {high} after {attempts} tries")
