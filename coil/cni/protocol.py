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
stdin (DEFAULT_SOCKET when absent, empty or not a string).

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
# coild's plugin socket (coild's --socket default)
DEFAULT_SOCKET = "/run/coild.sock"
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
