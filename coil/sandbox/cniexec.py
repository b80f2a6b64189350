"""A small CNI executor: runs a conflist's plugin chain the way libcni does.

This is the *runtime* side of CNI (what containerd/CRI-O do through libcni),
which is why it lives in the sandbox and not in ``coil/cni/`` (that package
is the *plugin* side: stdlib only, started once per ADD by the runtime). The
sandbox uses it to wire its pods, so that ``pip install`` plus etcd and BIRD
is enough for ``hypercoil sandbox up``. The tests keep Debian's libcni
(tests/cniclient/cnitool) as the independent client, and
tests/integration/test_cniexec.py runs both against the same plugins.

What it does, as libcni v1.1 (``libcni/api.go``) does:

- each plugin's config is the plugin's object from the list with the list's
  ``name`` and ``cniVersion`` copied in, and ``prevResult`` (the previous
  plugin's result) injected for every plugin after the first (ADD), or the
  cached ADD result for all of them (DEL, CHECK);
- ADD runs the plugins in order, DEL in reverse order, CHECK in order
  (CHECK needs cniVersion >= 0.4.0 and a cached result, and is skipped with
  ``disableCheck``);
- the environment: ``CNI_COMMAND``, ``CNI_CONTAINERID``, ``CNI_NETNS``,
  ``CNI_IFNAME``, ``CNI_ARGS`` (``K=V;K=V``), ``CNI_PATH``, on top of the
  caller's environment;
- the plugin binary is looked up by its ``type`` in the ``CNI_PATH``
  directories;
- the ADD result is cached in ``CACHE_DIR/results/NETWORK-CONTAINERID-IFNAME``
  (libcni's file name and ``cniCacheV1`` document), so that DEL and CHECK
  get it as ``prevResult``; DEL removes it; a DEL without a cache entry
  runs with no ``prevResult`` (as libcni does).

A plugin that fails ends the chain with :class:`CNIExecError` carrying the
plugin's CNI error object (``code``, ``msg``, ``details``); a client-side
failure (plugin not found, timeout, unparsable output) is code 999, libcni's
``ErrInternal``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from dataclasses import dataclass, field

from coil.errors import CoilError

ERR_INTERNAL = 999          # libcni's types.ErrInternal: failures on the client side


class CNIExecError(CoilError):
    """A plugin of the chain failed (its CNI error object), or the executor
    could not run it (code 999)."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self) -> dict:
        return {"code": self.code, "msg": self.msg, "details": self.details}


@dataclass
class Runtime:
    """One attachment: what libcni's RuntimeConf holds."""
    container_id: str
    netns: str
    ifname: str = "eth0"
    args: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def for_pod(cls, container_id: str, netns: str, ifname: str, namespace: str,
                name: str) -> "Runtime":
        """The CNI_ARGS the kubelet (dockershim/containerd) passes."""
        return cls(container_id, netns, ifname, [
            ("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", namespace),
            ("K8S_POD_NAME", name), ("K8S_POD_INFRA_CONTAINER_ID", container_id)])


def _version_tuple(v: str) -> tuple:
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (0,)


class Executor:
    """Runs conflists. ``path`` is CNI_PATH (a list of directories),
    ``cache_dir`` the result cache, ``wrapper`` an optional command prefix
    every plugin runs under (the sandbox uses ``ip netns exec NODE`` so that
    plugins run in the node's namespace, as they would on a real node)."""

    def __init__(self, path: list[str], cache_dir: str, wrapper: list[str] | None = None,
                 timeout: float = 120, env: dict | None = None):
        self.path = list(path)
        self.cache_dir = cache_dir
        self.wrapper = list(wrapper or [])
        self.timeout = timeout
        self.env = dict(os.environ if env is None else env)

    # -- the conflist --------------------------------------------------------
    @staticmethod
    def load(conflist_path: str) -> dict:
        try:
            with open(conflist_path, "rb") as f:
                raw = f.read()
            conf = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise CNIExecError(ERR_INTERNAL, f"conflist {conflist_path}: {exc}") from None
        if not isinstance(conf, dict) or not isinstance(conf.get("plugins"), list) \
                or not conf["plugins"] or not conf.get("name"):
            raise CNIExecError(ERR_INTERNAL, f"conflist {conflist_path}: needs a name "
                                             "and a non-empty plugins list")
        conf["_raw"] = raw
        return conf

    def find(self, plugin_type: str) -> str:
        """The plugin binary, by its ``type``, in the CNI_PATH directories."""
        if not plugin_type or "/" in plugin_type:
            raise CNIExecError(ERR_INTERNAL, f"bad plugin type {plugin_type!r}")
        for d in self.path:
            p = os.path.join(d, plugin_type)
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p
        raise CNIExecError(ERR_INTERNAL, f"failed to find plugin {plugin_type!r} in path "
                                         f"{self.path}")

    @staticmethod
    def plugin_config(conf: dict, plugin: dict, prev: dict | None) -> bytes:
        """libcni's buildOneConfig: name and cniVersion from the list,
        prevResult injected when there is one."""
        one = dict(plugin)
        one["name"] = conf["name"]
        one["cniVersion"] = conf.get("cniVersion", "0.4.0")
        if prev is not None:
            one["prevResult"] = prev
        return json.dumps(one).encode()

    # -- executing one plugin ------------------------------------------------
    def _env(self, command: str, rt: Runtime | None) -> dict:
        env = dict(self.env)
        env["CNI_COMMAND"] = command
        env["CNI_PATH"] = os.pathsep.join(self.path)
        if rt is not None:
            env["CNI_CONTAINERID"] = rt.container_id
            env["CNI_NETNS"] = rt.netns
            env["CNI_IFNAME"] = rt.ifname
            env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in rt.args)
        return env

    def exec_plugin(self, command: str, plugin_type: str, stdin: bytes,
                    rt: Runtime | None) -> dict | None:
        """Run one plugin; its parsed stdout on success (None when empty),
        CNIExecError with its error object on failure."""
        binary = self.find(plugin_type)
        try:
            r = subprocess.run(self.wrapper + [binary], input=stdin, capture_output=True,
                               env=self._env(command, rt), timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise CNIExecError(ERR_INTERNAL, f"{plugin_type} {command} timed out after "
                                             f"{self.timeout:g}s") from None
        except OSError as exc:
            raise CNIExecError(ERR_INTERNAL, f"{plugin_type}: {exc}") from None
        out = r.stdout.strip()
        parsed = None
        if out:
            try:
                parsed = json.loads(out)
            except ValueError:
                if r.returncode == 0:
                    raise CNIExecError(ERR_INTERNAL, f"{plugin_type} {command}: output is "
                                                     f"not JSON: {out[:200]!r}") from None
        if r.returncode != 0:
            if isinstance(parsed, dict) and "code" in parsed:
                raise CNIExecError(int(parsed.get("code") or ERR_INTERNAL),
                                   str(parsed.get("msg", "")), str(parsed.get("details", "")))
            err = r.stderr.decode(errors="replace").strip() or out.decode(errors="replace")
            raise CNIExecError(ERR_INTERNAL, f"{plugin_type} {command} exited "
                                             f"{r.returncode}: {err[:500]}")
        return parsed

    # -- the result cache ----------------------------------------------------
    def cache_file(self, network: str, rt: Runtime) -> str:
        return os.path.join(self.cache_dir, "results",
                            f"{network}-{rt.container_id}-{rt.ifname}")

    def _cache_write(self, conf: dict, rt: Runtime, result: dict | None):
        path = self.cache_file(conf["name"], rt)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        doc = {"kind": "cniCacheV1", "containerId": rt.container_id,
               "config": base64.b64encode(self._raw(conf)).decode(), "ifName": rt.ifname,
               "networkName": conf["name"], "cniArgs": [list(a) for a in rt.args]}
        if result is not None:
            doc["result"] = result
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)

    @staticmethod
    def _raw(conf: dict) -> bytes:
        """The conflist's bytes as read (libcni caches those), or as dumped."""
        raw = conf.get("_raw")
        if raw is None:
            raw = json.dumps({k: v for k, v in conf.items() if k != "_raw"}).encode()
        return raw

    def cached_result(self, network: str, rt: Runtime) -> dict | None:
        try:
            with open(self.cache_file(network, rt)) as f:
                return json.load(f).get("result")
        except (OSError, ValueError):
            return None

    def _cache_delete(self, network: str, rt: Runtime):
        try:
            os.unlink(self.cache_file(network, rt))
        except FileNotFoundError:
            pass

    # -- the chain -----------------------------------------------------------
    def add(self, conf: dict, rt: Runtime) -> dict | None:
        """ADD every plugin in order, each getting the previous result as
        prevResult; the last result is cached and returned."""
        prev = None
        for plugin in conf["plugins"]:
            prev = self.exec_plugin("ADD", plugin.get("type", ""),
                                    self.plugin_config(conf, plugin, prev), rt)
        self._cache_write(conf, rt, prev)
        return prev

    def delete(self, conf: dict, rt: Runtime):
        """DEL every plugin in reverse order with the cached ADD result as
        prevResult (for cniVersion >= 0.4.0), then drop the cache entry."""
        prev = None
        if _version_tuple(conf.get("cniVersion", "0.4.0")) >= (0, 4, 0):
            prev = self.cached_result(conf["name"], rt)
        for plugin in reversed(conf["plugins"]):
            self.exec_plugin("DEL", plugin.get("type", ""),
                             self.plugin_config(conf, plugin, prev), rt)
        self._cache_delete(conf["name"], rt)

    def check(self, conf: dict, rt: Runtime):
        """CHECK every plugin in order against the cached ADD result."""
        if _version_tuple(conf.get("cniVersion", "0.4.0")) < (0, 4, 0):
            raise CNIExecError(ERR_INTERNAL, f"configuration version {conf.get('cniVersion')!r}"
                                             " does not support the CHECK command")
        if conf.get("disableCheck"):
            return
        cached = self.cached_result(conf["name"], rt)
        if cached is None:
            raise CNIExecError(ERR_INTERNAL, f"no cached result for {conf['name']} "
                                             f"{rt.container_id} {rt.ifname}")
        for plugin in conf["plugins"]:
            self.exec_plugin("CHECK", plugin.get("type", ""),
                             self.plugin_config(conf, plugin, cached), rt)

    def version(self, plugin_type: str, cni_version: str = "1.0.0") -> dict | None:
        """CNI_COMMAND=VERSION of one plugin: its supported versions."""
        return self.exec_plugin("VERSION", plugin_type,
                                json.dumps({"cniVersion": cni_version}).encode(), None)
