"""The relay protocol between the ``coil`` CNI plugin and coild: its one owner.

The plugin executable (the native launcher coil/_fast/launcher.c, or its
pure-Python twin coil/cni/plugin.py) relays a CNI call to coild over
coild's UNIX socket; coild (coil/cni/service.py) does the work.

  request : MAGIC
            b"KEY=VALUE\\0" for each of ENV_KEYS that is set, in that order
            b"\\0"                                (end of the environment)
            the whole stdin                       (then shutdown(SHUT_WR))
  response: ASCII decimal exit code (0..255), b"\\n", stdout bytes until EOF

The socket is the top-level "socket" key of the network configuration on
stdin (DEFAULT_SOCKET when absent, empty or not a string), found by the
minimal scan of ``scan_netconf``; the plugin validates nothing else, coild
does (and answers a CNI error object for a document that is not JSON).

The native launcher is compiled with these constants: setup.py writes
``c_header()`` as protocol.h next to the object files, so the C code
never spells them itself. The plugin loads this module on every call: it
imports only coil.errors (pure Python, no imports of its own).
"""

from coil.errors import InvalidArgument

MAGIC = b"COIL1\n"
ENV_KEYS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
            "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
# CNI spec versions the coil plugin speaks, oldest first.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_CNI_VERSION = "1.1.0"
# coild's plugin socket: coild's --socket default, the plugin's when the
# configuration names none, the installer's default conflist and deploy/
# (the DaemonSet mounts the host's /run/coild).
DEFAULT_SOCKET = "/run/coild/coild.sock"
MAX_STDIN = 16 * 1024 * 1024          # larger stdin: ERR_DECODE, not relayed
MAX_RESPONSE = 64 * 1024 * 1024       # larger answer: malformed
# The runtime gives a CNI call 120 s: connect + answer stay under it and
# above coild's 100 s request deadline (docs/cni.md, "Timeouts").
CONNECT_TIMEOUT = 5.0                 # seconds coild has to accept
RELAY_TIMEOUT = 110.0                 # seconds coild has to answer


class FrameError(InvalidArgument):
    """A request frame that does not follow the protocol."""


def encode_request(env: dict, stdin: bytes) -> bytes:
    """The request frame for ``env`` (str keys; str values are encoded as
    os.environ decoded them; only ENV_KEYS are sent, in their order) and
    ``stdin``."""
    out = [MAGIC]
    for key in ENV_KEYS:
        value = env.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogateescape")
        out.append(key.encode() + b"=" + value + b"\0")
    out.append(b"\0")
    out.append(stdin)
    return b"".join(out)


def decode_request(data: bytes) -> tuple[dict, bytes]:
    """Split a request frame into (environment, stdin). Variables other
    than ENV_KEYS are dropped. Raises FrameError."""
    if not data.startswith(MAGIC):
        raise FrameError("the frame does not start with the protocol magic")
    env = {}
    pos = len(MAGIC)
    while True:
        end = data.find(b"\0", pos)
        if end < 0:
            raise FrameError("environment not terminated")
        item = data[pos:end]
        pos = end + 1
        if not item:
            return env, data[pos:]
        key, sep, value = item.partition(b"=")
        if sep and key.decode("ascii", "replace") in ENV_KEYS:
            env[key.decode()] = value.decode("utf-8", "replace")


def encode_response(code: int, stdout: bytes) -> bytes:
    """coild's answer frame: the plugin exits with ``code`` after printing
    ``stdout``."""
    if not 0 <= code <= 255:
        raise ValueError(f"exit code {code} is outside 0..255")
    return b"%d\n" % code + stdout


def decode_response(data: bytes) -> tuple[int, bytes] | None:
    """(exit code, stdout) of an answer frame, None when it is malformed
    (no 1..3 digit code 0..255 followed by a newline)."""
    newline = data.find(b"\n", 0, 4)
    head = data[:newline] if newline > 0 else b""
    if not (head.isdigit() and int(head) <= 255):
        return None
    return int(head), data[newline + 1:]


_ESCAPES = {ord('"'): b'"', ord("\\"): b"\\", ord("/"): b"/", ord("b"): b"\b",
            ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t"}
_WS = b" \t\n\r"


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    """Decode the JSON string whose opening quote is at ``pos``: (value,
    position after the closing quote). Bytes other than escapes are kept as
    they are (no UTF-8 check); a \\u escape is UTF-8 encoded, a lone
    surrogate too ("surrogatepass"). Raises ValueError for an unknown
    escape or a missing closing quote."""
    out = bytearray()
    pos += 1
    end = len(data)
    while True:
        quote = data.find(b'"', pos)
        slash = data.find(b"\\", pos, quote if quote >= 0 else end)
        if slash < 0:
            if quote < 0:
                raise ValueError("unterminated string")
            out += data[pos:quote]
            return bytes(out), quote + 1
        out += data[pos:slash]
        if slash + 1 >= end:
            raise ValueError("unterminated string")
        esc = data[slash + 1]
        pos = slash + 2
        if esc != ord("u"):
            if esc not in _ESCAPES:
                raise ValueError("invalid escape")
            out += _ESCAPES[esc]
            continue
        cp = _hex4(data, pos)
        pos += 4
        if 0xD800 <= cp <= 0xDBFF and data[pos:pos + 2] == b"\\u":
            try:
                lo = _hex4(data, pos + 2)
            except ValueError:
                lo = -1
            if 0xDC00 <= lo <= 0xDFFF:
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                pos += 6
        out += chr(cp).encode("utf-8", "surrogatepass")


def _hex4(data: bytes, pos: int) -> int:
    digits = data[pos:pos + 4]
    if len(digits) != 4 or not all(c in b"0123456789abcdefABCDEF" for c in digits):
        raise ValueError("invalid \\u escape")
    return int(digits, 16)


def _skip_value(data: bytes, pos: int) -> int:
    """The position of the ',' or '}' that ends the (non-string) value at
    ``pos`` at the top level; strings and nested brackets are stepped over."""
    depth = 0
    end = len(data)
    while pos < end:
        c = data[pos]
        if c == 0x22:                                   # '"'
            try:
                _, pos = _string(data, pos)
            except ValueError:
                return end
            continue
        if c in b"{[":
            depth += 1
        elif c in b"}]":
            if depth == 0:
                return pos
            depth -= 1
        elif c == 0x2C and depth == 0:                  # ','
            return pos
        pos += 1
    return end


def scan_netconf(data: bytes) -> tuple[bytes | None, bytes | None]:
    """(socket, cniVersion) of the network configuration on stdin: the last
    top-level string value of each key, decoded; None when absent or not a
    string (the caller treats b"" like None). Validates nothing: the scan
    walks the top-level members of the object and stops quietly at the
    first thing that is not a member, keeping what it found before. Nested
    keys and string values that contain "socket" never count. The native
    launcher's scan_netconf() follows the same rules byte for byte."""
    found = {b"socket": None, b"cniVersion": None}
    pos = 3 if data.startswith(b"\xef\xbb\xbf") else 0   # a BOM, as json.loads skips
    end = len(data)

    def ws(p):
        while p < end and data[p] in _WS:
            p += 1
        return p

    pos = ws(pos)
    if pos >= end or data[pos] != 0x7B:                # '{'
        return None, None
    pos += 1
    try:
        while True:
            pos = ws(pos)
            if pos >= end or data[pos] != 0x22:
                break
            key, pos = _string(data, pos)
            pos = ws(pos)
            if pos >= end or data[pos] != 0x3A:         # ':'
                break
            pos = ws(pos + 1)
            if key in found and pos < end and data[pos] == 0x22:
                found[key], pos = _string(data, pos)
            else:
                if key in found:
                    found[key] = None                   # not a string: the default
                pos = _skip_value(data, pos)
            pos = ws(pos)
            if pos >= end or data[pos] != 0x2C:
                break
            pos += 1
    except ValueError:
        pass
    return found[b"socket"], found[b"cniVersion"]


def c_header() -> str:
    """The constants above as C for the native launcher (protocol.h)."""
    from coil.cni import spec

    def c_str(value) -> str:
        if isinstance(value, bytes):
            value = value.decode("ascii")
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    versions = ",".join(f'"{v}"' for v in SUPPORTED_VERSIONS)
    lines = [
        "/* Generated from coil/cni/protocol.py by setup.py: do not edit. */",
        "#ifndef COIL_PROTOCOL_H",
        "#define COIL_PROTOCOL_H",
        f"#define RELAY_MAGIC {c_str(MAGIC)}",
        "#define RELAY_ENV_KEYS " + ", ".join(c_str(k) for k in ENV_KEYS),
        f"#define SUPPORTED_VERSIONS {c_str(versions)}",
        f"#define DEFAULT_CNI_VERSION {c_str(DEFAULT_CNI_VERSION)}",
        f"#define DEFAULT_SOCKET {c_str(DEFAULT_SOCKET)}",
        f"#define MAX_STDIN {MAX_STDIN}u",
        f"#define MAX_RESPONSE {MAX_RESPONSE}u",
        "#ifndef COIL_CONNECT_TIMEOUT_MS",
        f"#define COIL_CONNECT_TIMEOUT_MS {int(CONNECT_TIMEOUT * 1000)}",
        "#endif",
        "#ifndef COIL_RELAY_TIMEOUT_MS",
        f"#define COIL_RELAY_TIMEOUT_MS {int(RELAY_TIMEOUT * 1000)}",
        "#endif",
        f"#define ERR_IO {spec.ERR_IO}",
        f"#define ERR_DECODE {spec.ERR_DECODE}",
        f"#define ERR_TRY_AGAIN {spec.ERR_TRY_AGAIN}",
        f"#define ERR_NOT_AVAILABLE {spec.ERR_NOT_AVAILABLE}",
        "#endif",
    ]
    return "\n".join(lines) + "\n"
