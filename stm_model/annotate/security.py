"""Who may use an `stm annotate` server: the person who started it, as Jupyter decides it.

- A secret token (``secrets.token_urlsafe``) is part of the URL the command prints. The first
  visit with it sets a cookie (HttpOnly, SameSite=Strict, named after the port, since cookies
  are shared by every port of a host) and is redirected to the bare page, so the token leaves
  the address bar; a script sends ``Authorization: token <token>`` instead. Every request
  without it is refused: another user of the machine, or a page open in the browser, does
  not know it.
- The Host header must name this server: an IP address (which no DNS rebinding can put
  behind another site's name), localhost, the machine's own names, or the address it was
  told to listen on. A page on a rebound domain sends its own name and is refused.
- A request that changes anything (POST) must come from the page itself: its Origin, when the
  browser sends one, is this server's, and its Sec-Fetch-Site, when sent, is same-origin;
  its body is JSON by Content-Type, which a cross-site form or a no-preflight fetch
  (text/plain) cannot send.
- No CORS header is ever sent, so no other origin can read a response.
"""
import hmac
import http.cookies
import ipaddress
import secrets
import socket
import urllib.parse
from typing import Mapping, Optional

LOCAL_NAMES = ("localhost", "localhost.localdomain")
JSON_TYPE = "application/json"


def new_token() -> str:
    """A fresh secret: 32 random bytes, URL-safe text."""
    return secrets.token_urlsafe(32)


def browsable_host(host: str) -> str:
    """The address to print for a server bound to `host`: an address that binds every
    interface (0.0.0.0, ::) is opened as this machine's loopback address."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class Refused(Exception):
    """A request the guard turns away: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Guard:
    """The checks above for one server: `token` is its secret, `host` and `port` where it
    listens."""

    def __init__(self, token: str, host: str, port: int) -> None:
        self.token, self.host, self.port = token, host, port
        self.cookie_name = f"stm_annotate_{port}"
        self.names = {name.lower() for name in (*LOCAL_NAMES, host, _hostname(), _fqdn())
                      if name}

    def host_allowed(self, header: Optional[str]) -> bool:
        """Whether a Host header names this server (see the module docstring)."""
        if not header:
            return False
        name = urllib.parse.urlsplit(f"//{header}").hostname
        if name is None:
            return False
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name.lower() in self.names

    def token_in(self, headers: Mapping[str, str], query: str) -> tuple:
        """(authenticated, from_query): whether the request carries the token, in the cookie,
        the Authorization header or the query string (from_query: there, to be moved into
        the cookie)."""
        cookie = http.cookies.SimpleCookie()
        try:
            cookie.load(headers.get("Cookie") or "")
        except http.cookies.CookieError:
            cookie = http.cookies.SimpleCookie()
        if self.cookie_name in cookie and self._matches(cookie[self.cookie_name].value):
            return True, False
        scheme, _, value = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "token" and self._matches(value.strip()):
            return True, False
        given = urllib.parse.parse_qs(query).get("token", [])
        if any(self._matches(value) for value in given):
            return True, True
        return False, False

    def set_cookie(self) -> str:
        """The Set-Cookie header value that keeps the token for the page's later requests."""
        return f"{self.cookie_name}={self.token}; HttpOnly; SameSite=Strict; Path=/"

    def check(self, method: str, headers: Mapping[str, str], query: str) -> bool:
        """Refused unless the request may be served; returns whether its token came in the
        query string (a page visit then moves it into the cookie)."""
        if not self.host_allowed(headers.get("Host")):
            raise Refused(403, f"Host {headers.get('Host')!r} is not this server's address")
        authenticated, from_query = self.token_in(headers, query)
        if not authenticated:
            raise Refused(403, "open the URL that stm annotate printed (it holds the "
                               "server's token)")
        if method != "GET":
            origin = headers.get("Origin")
            if origin is not None and origin != f"http://{headers.get('Host')}":
                raise Refused(403, f"requests from {origin} are not accepted")
            site = headers.get("Sec-Fetch-Site")
            if site is not None and site not in ("same-origin", "none"):
                raise Refused(403, f"{site} requests are not accepted")
            kind = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind != JSON_TYPE:
                raise Refused(415, f"the body must be JSON (Content-Type: {JSON_TYPE}); got "
                                   f"{kind or 'none'}")
        return from_query

    def _matches(self, value: str) -> bool:
        return hmac.compare_digest(value.encode(), self.token.encode())


def _hostname() -> str:
    try:
        return socket.gethostname()
    except OSError:
        return ""


def _fqdn() -> str:
    try:
        return socket.getfqdn()
    except OSError:
        return ""
