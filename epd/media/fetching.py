"""Fetching an image URL from an untrusted request: scheme and address checks on every hop.

`fetch(url, limits, where, client)` GETs the URL with a byte cap and one deadline for the whole
fetch, following at most ``limits.max_redirects`` redirects by hand so that every hop is checked:
http(s) only, the host one of ``allowed_domains`` when that is set, and with ``block_link_local`` /
``block_private_networks`` every address the host resolves to must pass `address_refusal`. An IPv6
address that reaches an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4
``2002::/16``, Teredo, SIIT, IPv4-compatible ``::a.b.c.d``) is judged as that IPv4 address too;
NAT64 prefixes a network chose for itself cannot be known here. A plain-http request then goes to
the address that was checked (the Host header keeps the name), so a DNS answer that changes between
the check and the connection (DNS rebinding) cannot point it elsewhere; https needs no pin, as the
server must prove the name with its certificate. Errors are ``where.error(...)`` (``MediaError``),
never echoing URL credentials.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:   # types only: epd.media.loading imports this module
    from epd.media.loading import MediaError, MediaLimits, _Where

HEADERS = {"User-Agent": "epd-media/0.1", "Accept": "image/*"}
# Link-local covers 169.254.0.0/16 (AWS, GCP, Azure metadata); these are the other well-known ones.
_METADATA_NETS = (ipaddress.ip_network("100.100.100.200/32"), ipaddress.ip_network("fd00:ec2::254/128"))
# IPv6 ranges whose low 32 bits are an IPv4 address the packets go to: NAT64's well-known and local-use
# prefixes (RFC 6052's /96 form), SIIT's IPv4-translated and the deprecated IPv4-compatible addresses.
_LOW32_NETS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96", "::/96"))
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def reached_ipv4(ip: _Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address reaches through a translation or a tunnel; [] for any other."""
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)   # (server, client)
    if any(ip in net for net in _LOW32_NETS) and not (ip.is_loopback or ip.is_unspecified):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)]
    return []


def address_refusal(ip: _Address, limits: MediaLimits) -> str | None:
    """What kind of address the policy refuses ``ip`` as, or None when it may be fetched from."""
    reached = reached_ipv4(ip)
    if limits.block_link_local and any(a.is_link_local or any(a in net for net in _METADATA_NETS)
                                       for a in (ip, *reached)):
        return "a link-local / metadata address"
    # a translated address is judged by where it goes: ::ffff:8.8.8.8 is public, 64:ff9b::a00:1 is not
    if limits.block_private_networks and not all(a.is_global for a in reached or [ip]):
        return "a private-network address"
    return None


def _check_url(url: str, limits: MediaLimits, where: _Where) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise where.error(f"invalid URL {short(url)!r}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise where.error(f"not an http(s) URL with a host: {short(url)!r}")
    allowed = limits.allowed_domains
    if allowed is not None and parsed.host.rstrip(".").lower() not in allowed:
        listed = ", ".join(sorted(allowed)) or "none"
        raise where.error(f"URL host {parsed.host!r} is not one of the allowed media domains ({listed})")
    return parsed


def _shown(url: httpx.URL) -> str:
    return short(str(url.copy_with(userinfo=b"")))  # never echo credentials


async def _resolve(host: str, port: int | None) -> list[tuple]:
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


async def _check_host(url: httpx.URL, limits: MediaLimits, where: _Where) -> list[_Address]:
    """The addresses the host resolves to, once every one of them passed; [] when no address
    policy is on (then nothing is resolved here)."""
    if not (limits.block_link_local or limits.block_private_networks):
        return []
    try:
        infos = await _resolve(url.host, url.port)
    except socket.gaierror as exc:
        raise where.error(f"URL fetch failed: could not resolve host {url.host!r}") from exc
    checked: list[_Address] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        refused = address_refusal(ip, limits)
        if refused:
            raise where.error(f"URL host resolves to {refused}: {_shown(url)}")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip not in checked:
            checked.append(ip)
    return checked


async def _get(http: httpx.AsyncClient, url: httpx.URL, addresses: list[_Address], timeout: float) -> httpx.Response:
    """Send the GET (body not read yet). Plain http goes to the checked addresses in turn until one
    connects, the name in the Host header; https (the certificate binds the name) and unchecked
    hosts go as they are."""

    def request(address: _Address | None) -> httpx.Request:
        if address is None:
            return http.build_request("GET", url, headers=HEADERS, timeout=timeout)
        return http.build_request("GET", url.copy_with(host=str(address)), timeout=timeout,
                                  headers={**HEADERS, "Host": url.netloc.decode("ascii")})

    pinned = addresses if url.scheme == "http" and addresses else [None]
    for address in pinned[:-1]:
        try:
            return await http.send(request(address), stream=True, follow_redirects=False)
        except httpx.ConnectError:
            continue
    return await http.send(request(pinned[-1]), stream=True, follow_redirects=False)


def _next_hop(resp: httpx.Response, url: httpx.URL, limits: MediaLimits, where: _Where) -> str | None:
    """The redirect target, or None when ``resp`` is the image response (then checked)."""
    if resp.is_redirect:
        return str(url.join(resp.headers["location"]))
    if resp.status_code != 200:
        raise where.error(f"URL fetch failed: HTTP {resp.status_code} from {_shown(url)}")
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_bytes:
        raise _too_large(url, limits, where)
    return None


def _too_large(url: httpx.URL, limits: MediaLimits, where: _Where) -> MediaError:
    return where.error(f"URL fetch failed: {_shown(url)} is over the {limits.max_bytes}-byte limit")


async def fetch(url: str, limits: MediaLimits, where: _Where,
                client: httpx.AsyncClient | None) -> tuple[bytes, str | None]:
    """GET ``url`` with redirects followed by hand, so every hop gets the scheme and host checks."""
    http = httpx.AsyncClient(verify=_tls_context()) if client is None else client
    try:
        async with asyncio.timeout(limits.fetch_timeout_s):
            for _ in range(limits.max_redirects + 1):
                target = _check_url(url, limits, where)
                addresses = await _check_host(target, limits, where)
                resp = await _get(http, target, addresses, limits.fetch_timeout_s)
                try:
                    next_url = _next_hop(resp, target, limits, where)
                    if next_url is None:
                        body = bytearray()
                        async for chunk in resp.aiter_bytes():
                            body.extend(chunk)
                            if len(body) > limits.max_bytes:
                                raise _too_large(target, limits, where)
                        return bytes(body), resp.headers.get("content-type")
                finally:
                    await resp.aclose()
                url = next_url
    except (TimeoutError, httpx.TimeoutException) as exc:
        waited = f"timed out after {limits.fetch_timeout_s:g} s"
        raise where.error(f"URL fetch failed: {waited} fetching {short(url)}") from exc
    except httpx.HTTPError as exc:
        raise where.error(f"URL fetch failed: {type(exc).__name__} from {short(url)}") from exc
    finally:
        if client is None:
            await http.aclose()
    raise where.error(f"URL fetch failed: more than {limits.max_redirects} redirects, last to {short(url)}")


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()  # building one costs ~50 ms, so once per process


def fetch_blocking(url: str, limits: MediaLimits, where: _Where) -> tuple[bytes, str | None]:
    """``_fetch`` for sync callers, on its own thread so a caller's running loop is never in the way."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, fetch(url, limits, where, None)).result()
