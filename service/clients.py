"""Who sent a request: the socket's peer, or the address a trusted reverse proxy reports."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """``TRUSTED_PROXIES``: comma-separated addresses or CIDR blocks; ValueError names a bad one."""
    networks = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(item) from None
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address in its one form (an IPv4 address mapped into IPv6 is the IPv4 one), or None."""
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
        return _canonical(peer)
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return _canonical(hop) if _address(hop) else _canonical(peer)
    return _canonical(hops[0]) if hops else _canonical(peer)


def _canonical(address: str) -> str:
    ip = _address(address)
    return address if ip is None else str(ip)


def limited_as(address: str) -> str:
    """Who the per-client limits count: the address, or for IPv6 its /64, which one subscriber
    (one host, even) holds whole: one address each, a client had as many limits as it liked."""
    ip = _address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address
