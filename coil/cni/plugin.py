"""The ``coil`` CNI plugin in pure Python: the fallback of the native launcher.

Normally /opt/cni/bin/coil is the native ``hypercoil`` launcher
(coil/_fast/launcher.c), which relays the CNI request to the warm node
daemon coild without starting Python. When the launcher is not built, this
module does the same relay; it must stay byte-for-byte compatible with the
C client (same request framing, same outputs, same exit codes).

The relay protocol (framing, environment keys, default socket, timeouts)
is coil/cni/protocol.py. CNI_COMMAND=VERSION is answered locally.
Only os, sys and socket are imported.
"""

import os
import sys

from coil.cni import protocol, spec
from coil.cni.protocol import (CONNECT_TIMEOUT, DEFAULT_CNI_VERSION, DEFAULT_SOCKET,  # noqa: F401
                               MAX_RESPONSE, MAX_STDIN, RELAY_TIMEOUT)

SUN_PATH_MAX = 108                    # sizeof(sockaddr_un.sun_path) on Linux
DETAILS_START = ("start coild on this node or fix the 'socket' key "
                 "of the network configuration")


class _Config:
    """stdin and the two top-level keys the relay needs (bytes, as the
    minimal scan of protocol.scan_netconf decoded them; the defaults when
    absent, empty or not strings). Nothing else is checked here: coild
    validates the document and answers a CNI error object."""

    __slots__ = ("data", "socket", "cni_version")

    def __init__(self, data: bytes):
        self.data = data
        sock, version = protocol.scan_netconf(data)
        self.socket = sock or DEFAULT_SOCKET.encode()
        self.cni_version = version or DEFAULT_CNI_VERSION.encode()


_CONTROL = tuple((bytes([c]), {0x08: b"\\b", 0x09: b"\\t", 0x0A: b"\\n", 0x0C: b"\\f",
                               0x0D: b"\\r"}.get(c, b"\\u%04x" % c)) for c in range(0x20))


def _json_str(text: bytes) -> bytes:
    """``text`` as the inside of a JSON string, escaped like the launcher's
    buf_put_json (json.dumps with ensure_ascii=False); other bytes as they are."""
    text = text.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    for raw, esc in _CONTROL:
        if raw in text:
            text = text.replace(raw, esc)
    return text


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _emit(data: bytes) -> int:
    try:
        _write_all(1, data)
    except OSError as exc:
        sys.stderr.write(f"hypercoil: cannot write the answer: {exc.strerror}\n")
        return 1
    return 0


def error_bytes(code: int, msg: bytes, details: bytes, cni_version: bytes) -> bytes:
    """A CNI error object as the launcher prints it (spec.error_object's keys,
    compact, one line)."""
    return (b'{"cniVersion":"%s","code":%d,"msg":"%s","details":"%s"}\n'
            % (_json_str(cni_version), code, _json_str(msg), _json_str(details)))


def _error(code: int, msg, details: str, cni_version: bytes) -> int:
    if isinstance(msg, str):
        msg = msg.encode()
    _emit(error_bytes(code, msg, details.encode(), cni_version))
    return 1


def _read_stdin() -> bytes:
    chunks = []
    total = 0
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > MAX_STDIN:
            raise OverflowError


def main(argv=None) -> int:
    """Serve one CNI call; argv is ignored (CNI passes everything in the
    environment and on stdin)."""
    default_version = DEFAULT_CNI_VERSION.encode()
    try:
        data = _read_stdin()
    except OverflowError:
        return _error(spec.ERR_DECODE, "network configuration on stdin is larger "
                      f"than {MAX_STDIN >> 20} MiB", "", default_version)
    except OSError as exc:
        return _error(spec.ERR_IO, "cannot read the network configuration from "
                      f"stdin: {exc.strerror}", "", default_version)

    conf = _Config(data)
    if os.environ.get("CNI_COMMAND") == "VERSION":
        versions = ",".join(f'"{v}"' for v in protocol.SUPPORTED_VERSIONS).encode()
        return _emit(b'{"cniVersion":"%s","supportedVersions":[%s]}\n'
                     % (_json_str(conf.cni_version), versions))
    return _relay(conf)


def _relay(conf: _Config) -> int:
    import socket
    # coild out of reach: STATUS answers 50 (the plugin cannot serve, the
    # runtime marks the node not ready); every other command 11 (retry)
    unreachable = (spec.ERR_NOT_AVAILABLE if os.environ.get("CNI_COMMAND") == "STATUS"
                   else spec.ERR_TRY_AGAIN)
    # "time" is loaded by the interpreter at start-up already: no import cost
    from time import monotonic

    path = conf.socket
    sock = None
    try:
        if len(path) > SUN_PATH_MAX:
            raise OSError(36, os.strerror(36))     # ENAMETOOLONG, as in C
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)     # a full listen queue must not block for ever
        sock.connect(path)
    except OSError as exc:
        if sock is not None:
            sock.close()
        return _error(unreachable, b"coild is not reachable at " + path + b": "
                      + _reason(exc), DETAILS_START, conf.cni_version)

    with sock:
        deadline = monotonic() + RELAY_TIMEOUT
        try:
            sock.settimeout(max(deadline - monotonic(), 0.001))
            sock.sendall(protocol.encode_request(os.environ, conf.data))
        except TimeoutError:
            return _timeout(conf, path, unreachable)
        except OSError:
            pass        # coild may have answered and closed early: read it
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

        chunks = []
        total = 0
        try:
            while True:
                sock.settimeout(max(deadline - monotonic(), 0.001))
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    # coild closed with part of our request unread (it
                    # answered early): all queued data came first, so
                    # this is the end of the answer
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > MAX_RESPONSE:
                    chunks = []     # too large: malformed
                    break
        except TimeoutError:
            return _timeout(conf, path, unreachable)
        except OSError as exc:
            return _error(unreachable, b"lost the connection to coild at " + path
                          + b": " + _reason(exc), "", conf.cni_version)
    answer = protocol.decode_response(b"".join(chunks))
    if answer is None:
        return _error(unreachable, b"malformed answer from coild at " + path,
                      "the answer must start with the exit code and a newline; "
                      "check the coild log", conf.cni_version)
    if _emit(answer[1]):
        return 1
    return answer[0]


def _reason(exc: OSError) -> bytes:
    return str(exc.strerror or exc).encode()


def _timeout(conf: _Config, path: bytes, code: int) -> int:
    return _error(code, b"coild at " + path + b" did not answer within %d s"
                  % int(RELAY_TIMEOUT),
                  "coild may be overloaded or hung; check the coild log",
                  conf.cni_version)
