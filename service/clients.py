"""Who sent a request: the socket's peer, or the address a trusted reverse proxy reports."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # IPv4 addresses written as IPv6 ones


def parse_networks(text: str) -> tuple[Network, ...]:
    """``TRUSTED_PROXIES``: comma-separated addresses or CIDR blocks; ValueError names a bad one.
    A block of IPv4 addresses written as IPv6 (``::ffff:10.0.0.0/104``) is taken as the IPv4
    block, as the addresses are (``_address``)."""
    networks: list[Network] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(item) from None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(MAPPED):
            network = ipaddress.IPv4Network((network.network_address.ipv4_mapped, network.prefixlen - 96))
        networks.append(network)
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address in its one form (an IPv4 address mapped into IPv6 is the IPv4 one), or None.
    A port some proxies add is dropped: ``1.2.3.4:5678``, ``[2001:db8::1]:443``."""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def _trusted(address: str, proxies: Iterable[Network]) -> bool:
    ip = _address(address)
    return ip is not None and any(ip in network for network in proxies)


def client_address(peer: str, forwarded_for: str | None, proxies: tuple[Network, ...]) -> str:
    """The peer, unless the peer is a trusted proxy: then the right-most address of
    ``X-Forwarded-For`` that is not itself a trusted proxy (the left part is the client's own
    say, which anyone can forge). In its one form: five spellings of one IPv6 address, or
    ``::ffff:10.0.0.1`` and ``10.0.0.1``, were five clients to the rate limits; and not an
    address at all, the proxy's word is not taken."""
    if not proxies or not forwarded_for or not _trusted(peer, proxies):
        return canonical(peer)
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return canonical(hop) if _address(hop) else canonical(peer)
    return canonical(hops[0]) if hops else canonical(peer)


def canonical(address: str) -> str:
    """``address`` in its one form (``_address``), or as it is if it is none."""
    ip = _address(address)
    return address if ip is None else str(ip)


def limited_as(address: str) -> str:
    """Who the per-client limits count: the address, or for IPv6 its /64, which one subscriber
    (one host, even) holds whole: one address each, a client had as many limits as it liked."""
    ip = _address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address
