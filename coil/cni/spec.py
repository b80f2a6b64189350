"""CNI specification constants shared by the plugin, coild and the tests.

SUPPORTED_VERSIONS and DEFAULT_CNI_VERSION are owned by the relay protocol
(coil/cni/protocol.py).
"""

from coil.cni.protocol import DEFAULT_CNI_VERSION, SUPPORTED_VERSIONS  # noqa: F401
from coil.errors import CoilError

# Well-known CNI error codes (CNI spec, "Error").
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_NETCONF = 7
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50
ERR_LIMITED = 51


def error_object(code: int, msg: str, details: str = "",
                 cni_version: str = DEFAULT_CNI_VERSION) -> dict:
    """A CNI error result as printed on stdout (key order as the spec)."""
    return {"cniVersion": cni_version, "code": code, "msg": msg, "details": details}


# Coil's own error codes (CNI reserves 100 and above for plugins).
ERR_INTERNAL = 100
ERR_NO_POOL = 101
ERR_POOL_EXHAUSTED = 102
ERR_NETWORK = 103
ERR_CHECK_FAILED = 104
ERR_FORBIDDEN = 105          # the caller of coild's plugin socket is not root


class CNIError(CoilError):
    """An error to report as a CNI error object. Raised and caught inside
    coild only (the edge where errors become CNI codes)."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = DEFAULT_CNI_VERSION) -> dict:
        return error_object(self.code, self.msg, self.details, cni_version)


def version_tuple(version: str) -> tuple:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (0,)


def build_result(cni_version: str, host_name: str, host_mac: str, ifname: str,
                 container_mac: str, netns: str, addresses: list, gateways: dict,
                 mtu: int | None = None, prev: dict | None = None) -> dict:
    """The ADD result in the shape of ``cni_version``: interfaces (host end,
    then container end), one /32 or /128 per address on the container end,
    the on-link route to each gateway (``scope`` link from 1.1.0) and the
    default routes via them. From 1.1.0 the container end carries its
    ``mtu``. ``prev``: the prevResult of the plugins before coil in the
    chain; its interfaces, ips, routes and dns come first, unchanged."""
    # coild's side only: the plugin itself never builds a result
    from coil.net.types import RT_SCOPE_LINK, host_prefixlen, ip_version
    legacy = version_tuple(cni_version) < (1, 0, 0)
    v11 = version_tuple(cni_version) >= (1, 1, 0)
    prev = prev if isinstance(prev, dict) else {}
    prev_ifaces = [i for i in prev.get("interfaces") or [] if isinstance(i, dict)]
    base = len(prev_ifaces)
    ips, routes = [], []
    onlink = []
    for addr in addresses:
        version = ip_version(addr)
        plen = host_prefixlen(addr)
        gw = gateways[addr]
        entry = {"address": f"{addr}/{plen}", "gateway": gw, "interface": base + 1}
        if legacy:
            entry = {"version": str(version), **entry}
        ips.append(entry)
        route = {"dst": f"{gw}/{plen}"}
        if v11:
            route["scope"] = RT_SCOPE_LINK
        onlink.append(route)
        routes.append({"dst": "::/0" if version == 6 else "0.0.0.0/0", "gw": gw})
    container = {"name": ifname, "mac": container_mac, "sandbox": netns}
    if v11 and mtu:
        container["mtu"] = mtu
    out = {"cniVersion": cni_version,
           "interfaces": prev_ifaces + [{"name": host_name, "mac": host_mac}, container],
           "ips": [i for i in prev.get("ips") or [] if isinstance(i, dict)] + ips,
           "routes": [r for r in prev.get("routes") or [] if isinstance(r, dict)]
           + onlink + routes,
           "dns": prev.get("dns") if isinstance(prev.get("dns"), dict) else {}}
    return out
