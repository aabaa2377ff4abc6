"""Where pfsync may send a request: the rules every URL obeys, configured or server-supplied.

One rule set for a configured base URL and for every URL a server hands us (a redirect's Location,
an export's status URL, manifest file URLs, `next` links, attachment URLs):

- the scheme is https, or http to a loopback host (127.0.0.0/8, ::1, localhost), or plain http
  anywhere once `http.allow_insecure_http` is set;
- a literal address in a special-purpose range (link-local such as the cloud metadata address
  169.254.169.254, unspecified, multicast, reserved, shared address space, benchmarking, IETF
  protocol assignments, NAT64) is refused unless a network in `http.allow_networks` holds it.
  Private ranges (10/8, 172.16/12, 192.168/16, fc00::/7) stay allowed: a self-hosted Medplum
  lives there. A host name is checked by what it resolves to (`resolved_problem`, once per
  name and process); the connection itself may resolve it again, so a name whose answers
  change between the two (DNS rebinding) is not covered.

Kept free of settings and httpx so that settings validation and the client factory share it.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# IANA special-purpose registries (RFC 6890 and successors), minus loopback and private ranges.
SPECIAL_NETWORKS: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "100.64.0.0/10",  # shared address space (CGNAT; one cloud's metadata service lives here)
        "169.254.0.0/16",  # link-local: cloud metadata services
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
        "::/128",  # unspecified
        "64:ff9b::/96",  # NAT64: reaches any IPv4 address, the ranges above included
        "100::/64",  # discard-only
        "2001:db8::/32",  # documentation
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local
        "ff00::/8",  # multicast
        "fd00:ec2::254/128",  # a cloud metadata service's IPv6 address
    )
)


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings as networks; ValueError names the first that is not one."""
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())


def _address(host: str, *, unmap: bool = True) -> Address | None:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if unmap and isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    return address


def is_loopback_host(host: str) -> bool:
    """localhost or a loopback literal (an IPv4-mapped loopback is not trusted as one)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    address = _address(host, unmap=False)
    return address is not None and address.is_loopback


def url_problem(
    url: str, *, allow_insecure_http: bool = False, allow_networks: Iterable[Network] = ()
) -> str | None:
    """Why a request to `url` is refused, or None when it may be sent."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "it is not a valid URL"
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return f"its scheme {scheme or '(none)'!r} is neither https nor http"
    if not host:
        return "it has no host"
    if scheme == "http" and not allow_insecure_http and not is_loopback_host(host):
        return "it uses plain http to a non-loopback host"
    address = _address(host)
    if address is not None and _refused(address, allow_networks):
        return f"{address} is in a special-purpose address range"
    return None


def _refused(address: Address, allow_networks: Iterable[Network]) -> bool:
    """In a special-purpose range and not in one the user allowed."""
    return any(address in n for n in SPECIAL_NETWORKS) and not any(
        address in n for n in allow_networks if n.version == address.version
    )


def same_origin(a: str, b: str) -> bool:
    """scheme, host and port equal (default ports filled in)."""
    return origin(a) == origin(b)


def origin(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme, 0)
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


def shown_url(url: str) -> str:
    """The URL as shown to people: no user info, query (signed-URL signatures, tokens) or fragment."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an invalid URL)"
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


@functools.lru_cache(maxsize=256)
def _resolve(host: str) -> tuple[str, ...]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return ()  # unresolvable here (or only through a proxy): the connection will tell
    return tuple(sorted({str(info[4][0]) for info in infos}))


def resolved_problem(url: str, *, allow_networks: Iterable[Network] = ()) -> str | None:
    """Why a request to `url` is refused for what its host name resolves to (a special-purpose
    address), or None. Literal addresses and localhost are url_problem's."""
    host = urlsplit(url).hostname or ""
    if not host or _address(host) is not None or is_loopback_host(host):
        return None
    allowed = tuple(allow_networks)
    for text in _resolve(host.lower()):
        address = _address(text.split("%", 1)[0])
        if address is not None and _refused(address, allowed):
            return f"its host {host} resolves to {address}, in a special-purpose address range"
    return None
