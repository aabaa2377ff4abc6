"""The one place a real httpx.Client is built (`make_client`: TLS verification on, CAs and proxy from
pfsync's settings, our User-Agent) and `RequestGuard`, its event hooks: the URL rules of
pfsync.core.netpolicy on every hop, the redirect rules, attachments pinned to their origin, and
bounded bodies. `protocol_error` turns an httpx failure that escaped into a documented error.

May import: pfsync.core, pfsync.net.responses, pfsync.net.decode.
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from pfsync import __version__
from pfsync.core.errors import ConfigError, HTTPError, PfsyncError, ProtocolError
from pfsync.core.netpolicy import Network, origin, parse_networks, resolved_problem, shown_url, url_problem
from pfsync.core.redact import register
from pfsync.core.settings import HttpSettings
from pfsync.net.decode import DECODABLE, BoundedBody
from pfsync.net.responses import server_text

USER_AGENT = f"pfsync/{__version__}"


MAX_REDIRECTS = 5
# Request extension naming the origin a request and all its redirects must stay on (attachments).
PIN_ORIGIN = "pfsync_pin_origin"
# Request extension: the caller streams and bounds the body itself (iter_decoded; export files,
# attachments), so http.max_response_bytes does not apply.
STREAMED = "pfsync_streamed"
_SAFE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class RequestGuard:
    """pfsync.core.netpolicy on every hop of every request, and the redirect rules, as httpx event hooks
    (httpx calls request hooks for each hop of a redirect chain, response hooks for each answer).

    A redirect is followed only for a GET or HEAD without a body and without Basic credentials:
    a token POST, a Bundle or an upload answered with 307/308 would otherwise re-send its secrets
    or data to wherever the Location points. A bearer token never follows a redirect to another
    origin (httpx drops Authorization there; pfsync.net.tokens.BearerAuth adds it only for allowed
    origins). A request carrying PIN_ORIGIN may not be redirected off that origin."""

    allow_insecure_http: bool = False
    allow_networks: tuple[Network, ...] = ()
    max_response_bytes: int | None = None

    def check_url(self, url: str, what: str) -> None:
        problem = url_problem(
            url, allow_insecure_http=self.allow_insecure_http, allow_networks=self.allow_networks
        )
        if problem is not None:
            raise ProtocolError(
                f"{what} {shown_url(url)} refused: {problem}",
                hint="a server handed pfsync this URL; if the address is really meant, add its range to "
                "PFSYNC_ALLOW_NETWORKS (or use https)",
            )

    def on_request(self, request: httpx.Request) -> None:
        url = str(request.url)
        self.check_url(url, "request to")
        problem = resolved_problem(url, allow_networks=self.allow_networks)
        if problem is not None:
            raise ProtocolError(f"request to {shown_url(url)} refused: {problem}",
                                hint="if the address is really meant, add its range to PFSYNC_ALLOW_NETWORKS")  # fmt: skip

    def on_response(self, response: httpx.Response) -> None:
        if not response.has_redirect_location:
            self._bound(response)
            return
        request = response.request
        target = str(request.url.join(response.headers["Location"]))
        where = f"{request.method} {shown_url(str(request.url))} answered {response.status_code}, a redirect to {shown_url(target)}"
        basic = request.headers.get("Authorization", "").lower().startswith("basic ")
        has_body = bool(
            request.headers.get("Content-Length", "0") not in ("", "0")
            or request.headers.get("Transfer-Encoding")
        )
        if request.method not in _SAFE_METHODS or has_body or basic:
            raise ProtocolError(
                f"{where}: not followed, pfsync never re-sends a request carrying a body or credentials",
                hint="configure the final URL itself (the redirect's target without its query)",
            )
        pinned = request.extensions.get(PIN_ORIGIN)
        if isinstance(pinned, str) and origin(target) != origin(pinned):
            raise ProtocolError(f"{where}: not followed, it leaves {shown_url(pinned)}'s origin")
        self.check_url(target, f"{where}:")

    def _bound(self, response: httpx.Response) -> None:
        """An answer read whole (not STREAMED by its caller): decoded in bounded pieces here, and
        refused past max_response_bytes, so a hostile body or gzip bomb cannot fill memory."""
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if (
            self.max_response_bytes is None
            or response.request.extensions.get(STREAMED)
            or encoding not in DECODABLE
        ):
            return
        where = f"{response.request.method} {shown_url(str(response.request.url))}"
        if not isinstance(response.stream, httpx.SyncByteStream):
            return  # an async stream: not ours
        response.stream = BoundedBody(response.stream, encoding, self.max_response_bytes, where)
        if encoding not in ("", "identity"):
            del response.headers["Content-Encoding"]  # decoded above: httpx must not decode again


# One SSLContext per CA source for the whole process: a sync builds five clients (source, source
# files, Medplum, Medplum token, state store) and each context loads the CA bundle again, about a
# megabyte apiece (docs/BENCHMARKS.md "Scale"). A context only configures connections; sharing it
# between clients and threads is what httpx does within one client already.
_contexts: dict[tuple[str, str | None, str | None], ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


def _ssl_context(settings: HttpSettings) -> ssl.SSLContext:
    """The CA trust: pfsync's own setting, else the environment's when trusted, else certifi."""
    env_file = os.environ.get("SSL_CERT_FILE") or None
    env_dir = os.environ.get("SSL_CERT_DIR") or None
    if settings.ca_bundle:
        key: tuple[str, str | None, str | None] = ("bundle", str(settings.ca_bundle), None)
    elif settings.trust_env and (env_file or env_dir):
        key = ("env", env_file, env_dir)
    else:
        key = ("certifi", None, None)
    with _contexts_lock:
        found = _contexts.get(key)
        if found is None:
            found = _contexts[key] = _new_context(key)
        return found


def _new_context(key: tuple[str, str | None, str | None]) -> ssl.SSLContext:
    kind, first, second = key
    try:
        if kind == "bundle":
            # An SSLContext rather than a path: httpx deprecates verify=<str>. Verification stays on.
            return ssl.create_default_context(cafile=first)
        if kind == "env":
            return ssl.create_default_context(cafile=first, capath=second)
    except (OSError, ssl.SSLError) as exc:
        name = "http.ca_bundle" if kind == "bundle" else "http.trust_env (SSL_CERT_FILE / SSL_CERT_DIR)"
        raise ConfigError(f"{name}: the CA certificates cannot be loaded: {exc.__class__.__name__}: {exc}",
                          setting="http.ca_bundle" if kind == "bundle" else "http.trust_env") from None  # fmt: skip
    return httpx.create_ssl_context(verify=True, trust_env=False)  # certifi's bundle, as httpx's default


def make_client(settings: HttpSettings, *, timeout: float | None = None, **kwargs: Any) -> httpx.Client:
    """The one place a real httpx.Client is built: TLS verification always on (CA from pfsync's
    settings), our User-Agent, proxy from pfsync's settings (the environment only with
    http.trust_env), and RequestGuard on every hop. Redirects of GETs are followed (signed
    storage), within RequestGuard's rules, at most MAX_REDIRECTS deep."""
    t = timeout if timeout is not None else settings.timeout
    if settings.proxy:  # a proxy URL may carry credentials: never shown
        register(urlsplit(settings.proxy).password)
    guard = RequestGuard(settings.allow_insecure_http, parse_networks(settings.allow_networks),
                         settings.max_response_bytes)  # fmt: skip
    return httpx.Client(
        verify=_ssl_context(settings),
        timeout=httpx.Timeout(t, connect=min(t, 30.0)),
        headers={"User-Agent": USER_AGENT},
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        trust_env=settings.trust_env,
        proxy=settings.proxy,
        event_hooks={"request": [guard.on_request], "response": [guard.on_response]},
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        **kwargs,
    )


def protocol_error(exc: httpx.HTTPError) -> PfsyncError:
    """A clear, documented error for an httpx failure that escaped the code that handles it:
    network failures are temporary (75), a redirect loop or an undecodable body is a refused
    answer (5). The URL is shown without its query; the exception text is redacted."""
    try:
        url = shown_url(str(exc.request.url))
        method = exc.request.method
    except RuntimeError:  # no request attached
        url, method = "(unknown URL)", "?"
    if isinstance(exc, httpx.TooManyRedirects):
        return ProtocolError(f"{method} {url}: more than {MAX_REDIRECTS} redirects (a redirect loop?)")
    if isinstance(exc, httpx.DecodingError):
        return ProtocolError(f"{method} {url}: the answer could not be decoded (its Content-Encoding does not "
                             "match its body)")  # fmt: skip
    if isinstance(exc, httpx.TransportError):
        return HTTPError(f"{method} {url} failed: {exc.__class__.__name__}", method=method, url=url)
    return ProtocolError(f"{method} {url}: {exc.__class__.__name__}: {server_text(str(exc))}")
