"""``hypercoil coil-installer``: the init container of the coild DaemonSet.

Configured by the environment (v1 names and defaults):

    CNI_CONF_NAME     10-coil.conflist      file name of the CNI configuration
    CNI_ETC_DIR       /host/etc/cni/net.d   where it is written
    CNI_BIN_DIR       /host/opt/cni/bin     where ``coil`` is installed
    COIL_PATH         the native launcher (``hypercoil``), else the Python
                      entry point            what is installed as ``coil``
    CNI_NETCONF       the conflist itself, or (when CNI_NETCONF is empty)
    CNI_NETCONF_FILE  a file with the conflist to write (v1's precedence)
                                             (default: coil + portmap + bandwidth)
    COIL_NODE_NAME    this node's name (needed to remove the taint)
    COIL_BOOT_TAINT   coil.cybozu.com/bootstrap   comma-separated taint keys
                      to remove from the Node once installed (empty: none)
    COIL_PROC_SYS     /proc/sys              sysctl tree (tests point it elsewhere)
    COIL_INSTALLER_API_TIMEOUT  2m           how long to retry the API server
    COIL_INSTALLER_RESCAN_WAIT  6s           wait before removing the taint (v1's)
    COIL_LOG_LEVEL    info                   debug, info, warning or error

Steps, in order; everything is validated before anything is written:
install ``coil`` (copy to a temp file in the same directory, then rename),
write the conflist (same), then remove every other CNI configuration file
(``*.conf``, ``*.conflist``, ``*.json``) from CNI_ETC_DIR as v1 did, so that
no other network can sort first and win; enable IPv4 and IPv6 forwarding;
remove the taint keys from the Node (optimistic concurrency: patch guarded
by the resourceVersion), but only after COIL_INSTALLER_RESCAN_WAIT: the
kubelet rescans CNI_ETC_DIR every 5 s, and a Pod scheduled before it saw
coil's conflist would fail. Re-running it changes nothing that is already
right (and does not wait when there is no taint left to remove).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time

from coil.cni.protocol import DEFAULT_SOCKET
from coil.errors import CoilError, InvalidArgument, KubernetesError, UsageError

log = logging.getLogger("coil-installer")

DEFAULTS = {
    "CNI_CONF_NAME": "10-coil.conflist",
    "CNI_ETC_DIR": "/host/etc/cni/net.d",
    "CNI_BIN_DIR": "/host/opt/cni/bin",
    "COIL_BOOT_TAINT": "coil.cybozu.com/bootstrap",
    "COIL_PROC_SYS": "/proc/sys",
    "COIL_INSTALLER_API_TIMEOUT": "2m",
    "COIL_INSTALLER_RESCAN_WAIT": "6s",
}

# what libcni (and so the kubelet) loads from CNI_ETC_DIR
CNI_CONF_SUFFIXES = (".conf", ".conflist", ".json")

# "cniVersion" 1.0.0 for runtimes whose libcni predates the list (they keep
# 1.0.0); libcni 1.2 and later (containerd 2.x) pick the highest of
# "cniVersions" they know, 1.1.0, and so call GC and STATUS. docs/cni.md
DEFAULT_NETCONF = {
    "cniVersion": "1.0.0",
    "cniVersions": ["1.0.0", "1.1.0"],
    "name": "k8s-pod-network",
    "plugins": [
        {"type": "coil", "socket": DEFAULT_SOCKET},
        {"type": "portmap", "capabilities": {"portMappings": True}},
        {"type": "bandwidth", "capabilities": {"bandwidth": True}},
    ],
}

FORWARDING = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")


# -- configuration ---------------------------------------------------------------
def env(name: str, environ) -> str:
    value = environ.get(name)
    return DEFAULTS.get(name, "") if value is None else value


def default_coil_path() -> str:
    """The native launcher if built, else the ``hypercoil`` Python entry point."""
    from coil import launcher_path
    path = launcher_path()
    if path:
        return path
    candidate = os.path.join(os.path.dirname(sys.executable), "hypercoil")
    if os.access(candidate, os.X_OK):
        return candidate
    import shutil
    found = shutil.which("hypercoil")
    if found:
        return found
    raise InvalidArgument("cannot find hypercoil to install", hint="set COIL_PATH")


def validate_netconf(text: str, conf_name: str, source: str) -> bytes:
    """Parse and check a CNI network configuration; the bytes to write."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"invalid {source}: not JSON ({exc.msg} at line {exc.lineno} "
                              f"column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"invalid {source}: expected a JSON object")
    from coil.cni.spec import SUPPORTED_VERSIONS
    supported = ", ".join(SUPPORTED_VERSIONS)
    version = doc.get("cniVersion")
    versions = doc.get("cniVersions")
    if version is None and versions is None:
        raise InvalidArgument(f"invalid {source}: needs \"cniVersion\" or \"cniVersions\"")
    if version is not None and (not isinstance(version, str)
                                or version not in SUPPORTED_VERSIONS):
        raise InvalidArgument(f"invalid {source}: cniVersion {version!r} is not one of "
                              f"{supported}")
    if versions is not None:
        # the runtime picks one of the list: each must be one coil speaks
        if not isinstance(versions, list) or not versions:
            raise InvalidArgument(f"invalid {source}: \"cniVersions\" must be a non-empty "
                                  f"list of versions")
        for v in versions:
            if not isinstance(v, str) or v not in SUPPORTED_VERSIONS:
                raise InvalidArgument(f"invalid {source}: cniVersions entry {v!r} is not one "
                                      f"of {supported}")
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument(f"invalid {source}: \"name\" must be a non-empty string")
    if "plugins" not in doc and "type" in doc:
        raise InvalidArgument(f"invalid {source}: a single-plugin .conf configuration is not "
                              f"supported (removed in CNI 1.0); write a conflist with a "
                              f"\"plugins\" list")
    plugins = doc.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise InvalidArgument(f"invalid {source}: \"plugins\" must be a non-empty list "
                              f"(the file is a .conflist)")
    for i, plugin in enumerate(plugins):
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str) \
                or not plugin["type"]:
            raise InvalidArgument(f"invalid {source}: plugins[{i}] needs a \"type\"")
    types = [p["type"] for p in plugins]
    if "coil" not in types:
        raise InvalidArgument(f"invalid {source}: no plugin of type \"coil\"")
    return (json.dumps(doc, indent=2) + "\n").encode()


def load_netconf(environ, conf_name: str) -> bytes:
    """CNI_NETCONF when set and not empty, else CNI_NETCONF_FILE, else the
    default (v1's precedence)."""
    text = environ.get("CNI_NETCONF")
    if text is not None and text.strip():
        return validate_netconf(text, conf_name, "CNI_NETCONF")
    path = environ.get("CNI_NETCONF_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise InvalidArgument(f"cannot read CNI_NETCONF_FILE {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise InvalidArgument(f"invalid CNI_NETCONF_FILE {path}: not UTF-8 text") from None
        return validate_netconf(text, conf_name, f"CNI_NETCONF_FILE {path}")
    return validate_netconf(json.dumps(DEFAULT_NETCONF), conf_name, "default configuration")


def validate_conf_name(name: str) -> str:
    if name.endswith((".conf", ".json")) and "/" not in name:
        raise InvalidArgument(f"invalid CNI_CONF_NAME {name!r}: single-plugin .conf files "
                              f"were removed in CNI 1.0; use a name ending in .conflist")
    if not name or "/" in name or name in (".", "..") or name.startswith(".") \
            or not name.endswith(".conflist"):
        raise InvalidArgument(f"invalid CNI_CONF_NAME {name!r}: expected a file name ending "
                              f"in .conflist")
    return name


# -- file operations ---------------------------------------------------------------
def atomic_write(path: str, data: bytes, mode: int) -> bool:
    """Replace ``path`` with ``data`` atomically. False when it already has it."""
    try:
        with open(path, "rb") as f:
            if f.read() == data and (os.stat(path).st_mode & 0o777) == mode:
                return False
    except OSError:
        pass
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return True


def install_binary(src: str, bin_dir: str) -> bool:
    try:
        with open(src, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read COIL_PATH {src}: {exc.strerror}") from None
    return atomic_write(os.path.join(bin_dir, "coil"), data, 0o755)


def enable_forwarding(proc_sys: str) -> list[str]:
    """Write 1 to the forwarding sysctls; IPv6 may be absent (warned)."""
    changed = []
    for rel in FORWARDING:
        path = os.path.join(proc_sys, rel)
        try:
            with open(path) as f:
                if f.read().strip() == "1":
                    continue
            with open(path, "w") as f:
                f.write("1\n")
            changed.append(rel)
        except FileNotFoundError:
            if "ipv6" in rel:
                log.warning("IPv6 is disabled on this node; IPv6 forwarding not enabled",
                            extra={"path": path})
                continue
            raise CoilError(f"cannot enable IP forwarding: {path} does not exist") from None
        except OSError as exc:
            raise CoilError(f"cannot enable IP forwarding: writing {path}: {exc.strerror}",
                            hint="the installer needs a privileged container") from None
    return changed


def remove_other_confs(etc_dir: str, conf_name: str) -> list[str]:
    """Remove every CNI configuration file but ours from ``etc_dir`` (v1 did,
    so that a lower-sorting file of another network cannot win). Called after
    ours is in place, so the directory never lacks a configuration.
    Directories and files libcni does not load are left alone."""
    removed = []
    for name in sorted(os.listdir(etc_dir)):
        path = os.path.join(etc_dir, name)
        if name == conf_name or not name.endswith(CNI_CONF_SUFFIXES) or \
                (os.path.isdir(path) and not os.path.islink(path)):
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CoilError(f"cannot remove the other CNI configuration {path}: "
                            f"{exc.strerror}") from None
        removed.append(name)
    return removed


# -- the taint -------------------------------------------------------------------------
def remove_taints(core, node: str, keys: list[str], timeout: float,
                  sleep=time.sleep, before_patch=None, clock=time.monotonic) -> list[str]:
    """Remove taints with ``keys`` from ``node``; retried with backoff on API
    errors and conflicts until ``timeout`` (measured with ``clock``; a retry
    whose pause would end past it is not made). ``before_patch`` is called
    once, before the first patch (only when there is a taint to remove).
    Returns the keys removed."""
    from coil import k8s
    from coil.controller.watcher import Backoff
    backoff = Backoff(0.5, 10.0)
    deadline = clock() + timeout
    while True:
        try:
            resp = core.read_node(node, _preload_content=False,
                                  _request_timeout=k8s.REQUEST_TIMEOUT)
            try:
                obj = json.loads(resp.data)
            finally:
                resp.release_conn()
            taints = (obj.get("spec") or {}).get("taints") or []
            keep = [t for t in taints if t.get("key") not in keys]
            removed = [t.get("key") for t in taints if t.get("key") in keys]
            if not removed:
                return []
            if before_patch is not None:
                before_patch()
                before_patch = None
                continue                # read the Node again after the wait
            patch = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                     "spec": {"taints": keep or None}}
            resp = core.patch_node(node, patch, _content_type="application/merge-patch+json",
                                   _preload_content=False, _request_timeout=k8s.REQUEST_TIMEOUT)
            resp.release_conn()
            return removed
        except k8s.transient_errors() as exc:
            status = k8s.api_status(exc) if k8s.is_api_exception(exc) else 0
            if status == 404:
                raise KubernetesError(f"node {node} does not exist",
                                      hint="COIL_NODE_NAME must be this node's name "
                                           "(spec.nodeName)") from None
            if status in (401, 403):
                raise k8s.to_coil_error(exc, f"removing taints from node {node}") from None
            delay = backoff.next()
            if clock() + delay > deadline:
                raise k8s.to_coil_error(exc, f"removing taints from node {node} "
                                             f"(gave up after {timeout:g}s)") from None
            if status == 409:
                log.info("node changed meanwhile; retrying", extra={"node": node})
            else:
                log.warning("cannot reach the API server; retrying", extra={
                    "error": k8s.describe(exc), "retry_s": round(delay, 2)})
            sleep(delay)


# -- main ------------------------------------------------------------------------------
def run(environ=None, core=None, sleep=time.sleep) -> dict:
    """Do the installation; returns what was done. Raises CoilError."""
    from coil import config as cfg
    from coil.store.model import validate_node_name
    environ = os.environ if environ is None else environ
    conf_name = validate_conf_name(env("CNI_CONF_NAME", environ))
    etc_dir = env("CNI_ETC_DIR", environ)
    bin_dir = env("CNI_BIN_DIR", environ)
    proc_sys = env("COIL_PROC_SYS", environ)
    taint_keys = [k.strip() for k in env("COIL_BOOT_TAINT", environ).split(",") if k.strip()]
    api_timeout = cfg.parse_duration(env("COIL_INSTALLER_API_TIMEOUT", environ),
                                     "COIL_INSTALLER_API_TIMEOUT")
    rescan_wait = cfg.parse_duration(env("COIL_INSTALLER_RESCAN_WAIT", environ),
                                     "COIL_INSTALLER_RESCAN_WAIT")
    node = environ.get("COIL_NODE_NAME", "")
    if taint_keys:
        if not node:
            raise InvalidArgument("COIL_NODE_NAME is not set",
                                  hint="set it from spec.nodeName, or COIL_BOOT_TAINT= to skip "
                                       "removing the taint")
        validate_node_name(node)
    elif node:
        validate_node_name(node)
    netconf = load_netconf(environ, conf_name)
    src = environ.get("COIL_PATH") or default_coil_path()
    for what, d in (("CNI_BIN_DIR", bin_dir), ("CNI_ETC_DIR", etc_dir)):
        if not os.path.isdir(d):
            raise InvalidArgument(f"{what} {d} is not a directory",
                                  hint="mount the host directory into the container")

    done = {"binary_installed": install_binary(src, bin_dir),
            "conflist_written": atomic_write(os.path.join(etc_dir, conf_name), netconf, 0o644),
            "other_confs_removed": remove_other_confs(etc_dir, conf_name),
            "forwarding_enabled": enable_forwarding(proc_sys),
            "taints_removed": []}
    log.info("coil installed", extra={"bin": os.path.join(bin_dir, "coil"), "from": src,
                                      "conflist": os.path.join(etc_dir, conf_name),
                                      "changed_binary": done["binary_installed"],
                                      "changed_conflist": done["conflist_written"],
                                      "other_confs_removed": done["other_confs_removed"],
                                      "forwarding_enabled": done["forwarding_enabled"]})
    if taint_keys:
        if core is None:
            from coil import k8s
            core = k8s.core_api(k8s.api_client())

        def wait_for_rescan():
            log.info("waiting for the kubelet to rescan the CNI configuration",
                     extra={"wait_s": rescan_wait, "dir": etc_dir})
            sleep(rescan_wait)

        done["taints_removed"] = remove_taints(core, node, taint_keys, api_timeout,
                                               sleep=sleep, before_patch=wait_for_rescan)
        log.info("bootstrap taints", extra={"node": node, "removed": done["taints_removed"],
                                            "keys": taint_keys})
    return done


def main(argv: list[str]) -> int:
    from coil import logutil
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(__doc__.split("\n", 2)[2] if __doc__ else "")
        return 0
    if argv:
        raise UsageError(f"unexpected argument {argv[0]!r}",
                         hint="it is configured by environment variables; see --help")
    level = os.environ.get("COIL_LOG_LEVEL", "info")
    if level.lower() not in ("debug", "info", "warning", "error"):
        raise InvalidArgument(f"invalid COIL_LOG_LEVEL {level!r}: "
                              f"debug, info, warning or error")
    logutil.setup(level)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    run()          # a CoilError ends in coil/hypercoil.py's boundary: one line, exit 1
    return 0


if __name__ == "__main__":      # errors end in the one boundary, as for 'hypercoil coil-installer'
    from coil.hypercoil import run_role
    sys.exit(run_role("coil-installer", sys.argv[1:], main))
