"""The ``coil`` CNI plugin in pure Python: the fallback of the native launcher.

Normally /opt/cni/bin/coil is the native ``hypercoil`` launcher
(coil/_fast/launcher.c), which relays the CNI request to the warm node
daemon coild without starting Python. When the launcher is not built, this
module does the same relay; it must stay byte-for-byte compatible with the
C client (same request framing, same outputs, same exit codes).

The relay protocol (framing, environment keys, default socket, timeouts)
is coil/cni/protocol.py. CNI_COMMAND=VERSION is answered locally.
Only os, sys, socket and json are imported.
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
    """The two top-level keys the relay needs, and whether stdin is one JSON
    object at all (if not, every command but VERSION is answered with
    ERR_DECODE here: the socket of coild is unknown)."""

    __slots__ = ("data", "socket", "cni_version", "is_object")

    def __init__(self, data: bytes):
        import json
        self.data = data
        self.socket = DEFAULT_SOCKET
        self.cni_version = DEFAULT_CNI_VERSION
        self.is_object = False
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            return
        if not isinstance(doc, dict):
            return
        self.is_object = True
        value = doc.get("socket")
        if isinstance(value, str) and value:
            self.socket = value
        value = doc.get("cniVersion")
        if isinstance(value, str) and value:
            self.cni_version = value


NOT_AN_OBJECT = "network configuration on stdin is not a JSON object"


def _encode(text: str) -> bytes:
    # "surrogatepass" keeps lone surrogates as the C launcher encodes them
    return text.encode("utf-8", "surrogatepass")


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


def _dumps(obj) -> bytes:
    import json
    return _encode(json.dumps(obj, ensure_ascii=False, separators=(",", ":"))) + b"\n"


def _error(code: int, msg: str, details: str, cni_version: str) -> int:
    _emit(_dumps(spec.error_object(code, msg, details, cni_version)))
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
    try:
        data = _read_stdin()
    except OverflowError:
        return _error(spec.ERR_DECODE, "network configuration on stdin is larger "
                      f"than {MAX_STDIN >> 20} MiB", "", DEFAULT_CNI_VERSION)
    except OSError as exc:
        return _error(spec.ERR_IO, "cannot read the network configuration from "
                      f"stdin: {exc.strerror}", "", DEFAULT_CNI_VERSION)

    conf = _Config(data)
    if os.environ.get("CNI_COMMAND") == "VERSION":
        return _emit(_dumps({"cniVersion": conf.cni_version,
                             "supportedVersions": list(spec.SUPPORTED_VERSIONS)}))
    if not conf.is_object:
        return _error(spec.ERR_DECODE, NOT_AN_OBJECT, "", conf.cni_version)
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
    raw_path = _encode(path)
    sock = None
    try:
        if len(raw_path) > SUN_PATH_MAX:
            raise OSError(36, os.strerror(36))     # ENAMETOOLONG, as in C
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)     # a full listen queue must not block for ever
        sock.connect(raw_path)
    except OSError as exc:
        if sock is not None:
            sock.close()
        return _error(unreachable, f"coild is not reachable at {path}: "
                      f"{exc.strerror or exc}", DETAILS_START, conf.cni_version)

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
            return _error(unreachable, f"lost the connection to coild at "
                          f"{path}: {exc.strerror or exc}", "", conf.cni_version)
    answer = protocol.decode_response(b"".join(chunks))
    if answer is None:
        return _error(unreachable, f"malformed answer from coild at {path}",
                      "the answer must start with the exit code and a newline; "
                      "check the coild log", conf.cni_version)
    if _emit(answer[1]):
        return 1
    return answer[0]


def _timeout(conf: _Config, path: str, code: int) -> int:
    return _error(code, f"coild at {path} did not answer within "
                  f"{int(RELAY_TIMEOUT)} s",
                  "coild may be overloaded or hung; check the coild log",
                  conf.cni_version)
