"""etcd connection settings, shared by every role that talks to etcd.

Precedence: command-line flags > environment (``<ROLE>_ETCD_ENDPOINTS`` ...,
then for coilctl v1's ``COILCTL_ENDPOINTS`` ...) > a YAML/JSON config file
(``~/.coilctl.yml`` for coilctl; v1's ``tls-ca-file`` keys and inline PEM
too) > defaults. The flag names are v1's, so operators' scripts keep working.
"""

from __future__ import annotations

import dataclasses
import math
import os
from urllib.parse import urlsplit

from coil.errors import InvalidArgument

DEFAULT_ENDPOINTS = "http://127.0.0.1:2379"
DEFAULT_PREFIX = "/coil/"
DEFAULT_TIMEOUT = 5.0

# field name -> (flag, config-file key)
FIELDS = {
    "endpoints": ("--etcd-endpoints", "endpoints"),
    "prefix": ("--etcd-prefix", "prefix"),
    "timeout": ("--etcd-timeout", "timeout"),
    "username": ("--etcd-username", "username"),
    "password": ("--etcd-password", "password"),
    "password_file": ("--etcd-password-file", "password-file"),
    "tls_ca": ("--etcd-tls-ca", "tls-ca"),
    "tls_cert": ("--etcd-tls-cert", "tls-cert"),
    "tls_key": ("--etcd-tls-key", "tls-key"),
}


# Coil v1's coilctl (cybozu-go/etcdutil): config-file keys and, after the
# v1 environment prefix (``COILCTL_``), the same names upper-cased with
# '-' -> '_'. ``tls-ca`` etc. hold inline PEM in v1 and a file path here:
# a value starting with "-----BEGIN" is PEM, anything else a path.
V1_FILE_KEYS = {
    "tls_ca": "tls-ca-file",
    "tls_cert": "tls-cert-file",
    "tls_key": "tls-key-file",
}
V1_ENV_NAMES = {
    "endpoints": ("ENDPOINTS",),
    "prefix": ("PREFIX",),
    "timeout": ("TIMEOUT",),
    "username": ("USERNAME",),
    "password": ("PASSWORD",),
    "tls_ca": ("TLS_CA_FILE", "TLS_CA"),
    "tls_cert": ("TLS_CERT_FILE", "TLS_CERT"),
    "tls_key": ("TLS_KEY_FILE", "TLS_KEY"),
}
PEM_MARK = "-----BEGIN"
_pem_dir = None


def _pem_file(field: str, pem: str) -> str:
    """Write inline PEM to a private file (0600 in a 0700 directory removed
    at exit) and return its path: the etcd client takes files."""
    global _pem_dir
    import atexit
    import shutil
    import tempfile
    if _pem_dir is None:
        _pem_dir = tempfile.mkdtemp(prefix="coil-etcd-pem-")
        atexit.register(shutil.rmtree, _pem_dir, True)
    path = os.path.join(_pem_dir, f"{field}.pem")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(pem if pem.endswith("\n") else pem + "\n")
    return path


@dataclasses.dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINTS,)
    prefix: str = DEFAULT_PREFIX
    timeout: float = DEFAULT_TIMEOUT
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """Parse ``10m``, ``30s``, ``1h30m``, ``500ms`` or a number of seconds.

    Raises InvalidArgument naming the value.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text):
            raise InvalidArgument(f"invalid {what} {text!r}: must be a finite number")
        if text < 0:
            raise InvalidArgument(f"invalid {what} {text!r}: must not be negative")
        return float(text)
    s = str(text).strip()
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise InvalidArgument(f"invalid {what} {text!r}: must be a finite number")
        if value < 0:
            raise InvalidArgument(f"invalid {what} {text!r}: must not be negative")
        return value
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total, num, i = 0.0, "", 0
    if not s:
        raise InvalidArgument(f"invalid {what} {text!r}")
    while i < len(s):
        c = s[i]
        if c.isdigit() or c == ".":
            num += c
            i += 1
            continue
        unit = "ms" if s.startswith("ms", i) else c
        if unit not in units or not num:
            raise InvalidArgument(f"invalid {what} {text!r}: use forms like 30s, 10m, 1h")
        try:
            total += float(num) * units[unit]
        except ValueError:
            raise InvalidArgument(f"invalid {what} {text!r}") from None
        num = ""
        i += len(unit)
    if num:
        raise InvalidArgument(f"invalid {what} {text!r}: missing unit after {num}")
    if not math.isfinite(total):
        raise InvalidArgument(f"invalid {what} {text!r}: must be a finite number")
    return total


def split_endpoints(value: str) -> tuple[str, ...]:
    """Split and validate a comma-separated list of etcd URLs.

    ``@NAME`` is kept as it is (resolved later from Kubernetes Endpoints).
    """
    items = tuple(v.strip() for v in str(value).split(",") if v.strip())
    if not items:
        raise InvalidArgument(f"invalid etcd endpoints {value!r}: empty")
    for item in items:
        if item.startswith("@"):
            if len(items) != 1:
                raise InvalidArgument(f"invalid etcd endpoints {value!r}: @NAME cannot be mixed with URLs")
            continue
        u = urlsplit(item)
        if u.scheme == "unix":
            if not u.path.startswith("/") or u.netloc:
                raise InvalidArgument(f"invalid etcd endpoint {item!r}: expected unix:///ABSOLUTE/PATH")
            continue
        if u.scheme not in ("http", "https") or not u.hostname:
            raise InvalidArgument(f"invalid etcd endpoint {item!r}: expected http://HOST:PORT, "
                                  f"https://HOST:PORT or unix:///PATH")
        try:
            u.port
        except ValueError:
            raise InvalidArgument(f"invalid etcd endpoint {item!r}: bad port") from None
    return items


def load_file(path: str | None) -> dict:
    """Read a YAML or JSON config file; a missing default file is empty."""
    if not path:
        return {}
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        return {}
    try:
        import yaml
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise InvalidArgument(f"cannot read config file {path}: {exc.strerror}") from None
    except Exception as exc:  # yaml.YAMLError
        raise InvalidArgument(f"invalid config file {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"invalid config file {path}: expected a mapping of keys")
    known = {key for _, key in FIELDS.values()} | set(V1_FILE_KEYS.values())
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise InvalidArgument(f"invalid config file {path}: unknown key {unknown[0]!r}")
    return data


def read_secret(path: str, what: str) -> str:
    """The content of a secret file (a Kubernetes Secret mounted as a file,
    say), without one trailing newline. Raises InvalidArgument."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read(65537)
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > 65536:
        raise InvalidArgument(f"{what} {path} is larger than 64 KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what} {path} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise InvalidArgument(f"{what} {path} is empty")
    return text


def endpoints_given(flags: dict, env_prefix: str, config_file: str | None = None,
                    environ=None, v1_env_prefix: str | None = None) -> bool:
    """Whether a flag, the environment or the config file names etcd
    endpoints (the same sources as ``resolve``), rather than the built-in
    default being used. Raises InvalidArgument for a bad config file."""
    environ = os.environ if environ is None else environ
    if flags.get("endpoints") is not None:
        return True
    names = [env_prefix + "ENDPOINTS"]
    if v1_env_prefix:
        names += [v1_env_prefix + n for n in V1_ENV_NAMES["endpoints"]]
    if any(environ.get(n) is not None for n in names):
        return True
    return load_file(config_file).get(FIELDS["endpoints"][1]) is not None


def resolve(flags: dict, env_prefix: str, config_file: str | None = None,
            environ=None, v1_env_prefix: str | None = None) -> EtcdConfig:
    """Merge flags (values None when not given) > environment > file.

    ``env_prefix`` is e.g. ``COILCTL_ETCD_`` so that ``COILCTL_ETCD_ENDPOINTS``
    and ``COILCTL_ETCD_TLS_CA`` are read. ``v1_env_prefix`` (``COILCTL_`` for
    coilctl) also reads Coil v1's names (``COILCTL_ENDPOINTS``,
    ``COILCTL_TLS_CA_FILE``, ``COILCTL_TLS_CA`` with inline PEM, ...). Within
    one layer the current name wins over the v1 one. The password may come
    from a file (``--etcd-password-file``, ``<PREFIX>PASSWORD_FILE``,
    ``password-file``). Raises InvalidArgument.
    """
    environ = os.environ if environ is None else environ
    file_values = load_file(config_file)

    def from_env(field):
        value = environ.get(env_prefix + field.upper())
        if field == "password" and environ.get(env_prefix + "PASSWORD_FILE") is not None:
            return value                # the current names win over v1's in one layer
        if value is None and v1_env_prefix:
            for name in V1_ENV_NAMES.get(field, ()):
                value = environ.get(v1_env_prefix + name)
                if value is not None:
                    break
        return value

    def from_file(field):
        value = file_values.get(FIELDS[field][1])
        if value is None and field in V1_FILE_KEYS:
            value = file_values.get(V1_FILE_KEYS[field])
        return value

    layers = (("flags", lambda f: flags.get(f)), ("environment", from_env),
              ("config file", from_file))
    merged = {}
    for field in FIELDS:
        if field in ("password", "password_file"):
            continue
        for _, get in layers:
            value = get(field)
            if value is not None:
                merged[field] = value
                break
    # the password and the file holding it are one setting: the first source
    # that gives either wins, and one source must not give both
    for where, get in layers:
        value, path = get("password"), get("password_file")
        if value is not None and path is not None:
            raise InvalidArgument(f"both --etcd-password and --etcd-password-file are given "
                                  f"({where}): give one")
        if path is not None:
            merged["password"] = read_secret(str(path), "--etcd-password-file")
            break
        if value is not None:
            merged["password"] = value
            break
    for field in V1_FILE_KEYS:
        if field in merged and str(merged[field]).lstrip().startswith(PEM_MARK):
            merged[field] = _pem_file(field, str(merged[field]).strip())
    if "endpoints" in merged:
        eps = merged["endpoints"]
        if isinstance(eps, (list, tuple)):
            eps = ",".join(map(str, eps))
        elif "," not in str(eps):
            eps = ",".join(str(eps).split())       # v1 (viper) split a list on spaces
        merged["endpoints"] = split_endpoints(eps)
    if "prefix" in merged:
        prefix = str(merged["prefix"])
        if not prefix.startswith("/"):
            raise InvalidArgument(f"invalid etcd prefix {prefix!r}: must start with '/'")
        if not prefix.endswith("/"):
            prefix += "/"
        merged["prefix"] = prefix
    if "timeout" in merged:
        raw = merged["timeout"]
        merged["timeout"] = parse_duration(raw, "etcd timeout")
        if merged["timeout"] <= 0:
            raise InvalidArgument(f"invalid etcd timeout {raw!r}: must be positive")
    for key in ("tls_ca", "tls_cert", "tls_key"):
        if key in merged and not os.path.exists(str(merged[key])):
            raise InvalidArgument(f"{FIELDS[key][0]} file {merged[key]} does not exist")
    if ("username" in merged) != ("password" in merged):
        raise InvalidArgument("--etcd-username and --etcd-password (or --etcd-password-file) "
                              "must be given together")
    if ("tls_cert" in merged) != ("tls_key" in merged):
        raise InvalidArgument("--etcd-tls-cert and --etcd-tls-key must be given together")
    return EtcdConfig(**merged)
