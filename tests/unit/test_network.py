"""Interface choice helpers that read the kernel's tables (no sockets are opened here)."""

from __future__ import annotations

from pathlib import Path

from glue import network

HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


def _table(tmp_path: Path, *rows: str) -> str:
    path = tmp_path / "route"
    path.write_text(HEADER + "".join(row + "\n" for row in rows))
    return str(path)


def test_a_default_route_through_a_gateway_names_its_interface(tmp_path: Path) -> None:
    table = _table(
        tmp_path,
        "eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",
        "eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0",
    )
    assert network._default_route_interface(table) == "eth0"


def test_a_default_route_without_a_gateway_counts_too(tmp_path: Path) -> None:
    # `ip route add default dev wg0`: netifaces' gateways() does not list it.
    table = _table(tmp_path, "wg0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0")
    assert network._default_route_interface(table) == "wg0"


def test_no_default_route_or_a_down_one_gives_none(tmp_path: Path) -> None:
    table = _table(
        tmp_path,
        "eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",
        "eth1\t00000000\t00000000\t0000\t0\t0\t0\t00000000\t0\t0\t0",  # not RTF_UP
    )
    assert network._default_route_interface(table) is None
    assert network._default_route_interface(str(tmp_path / "missing")) is None


def test_the_most_specific_route_names_the_interface(tmp_path: Path) -> None:
    table = _table(
        tmp_path,
        "eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0",  # default via eth0
        "lo\t000000E0\t00000000\t0001\t0\t0\t0\t000000F0\t0\t0\t0",  # 224.0.0.0/4 dev lo
        "eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",  # 192.168.0.0/24 dev eth1
    )
    assert network._table_route_interface("239.192.137.1", table) == "lo"
    assert network._table_route_interface("192.168.0.7", table) == "eth1"
    assert network._table_route_interface("10.1.2.3", table) == "eth0"
    assert network._table_route_interface("10.1.2.3", _table(tmp_path)) is None
