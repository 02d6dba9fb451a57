"""Server ports come from below the kernel's ephemeral range, so a server's own port choices cannot take ours."""

from __future__ import annotations

import socket

import pytest

import xray.ports
from xray.ports import LOOPBACK, LOWEST, ephemeral_low, free_port, is_free


def test_a_free_port_is_below_the_ephemeral_range_and_bindable() -> None:
    for _ in range(20):
        port = free_port()
        assert LOWEST <= port < ephemeral_low()
        assert is_free(port)


def test_a_twin_port_is_free_too_and_taken_ports_are_skipped() -> None:
    port = free_port(twin_offset=10_000)
    assert port + 10_000 < ephemeral_low() and is_free(port + 10_000)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind((LOOPBACK, port))
        busy.listen()
        assert not is_free(port)
    taken = frozenset(range(LOWEST, ephemeral_low() - 1))  # all but one
    assert free_port(taken=taken, attempts=1_000_000) == ephemeral_low() - 1  # missed 1e6 times: p = e^-44


def test_no_room_below_the_ephemeral_range_is_a_clear_error(tmp_path, monkeypatch) -> None:
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("10000\t60999\n")
    monkeypatch.setattr(xray.ports, "RANGE_FILE", range_file)
    assert ephemeral_low() == 10_000
    with pytest.raises(OSError, match="no loopback ports between 10000 and the ephemeral range"):
        free_port()
