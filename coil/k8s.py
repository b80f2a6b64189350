"""Kubernetes API access for coil: client configuration, typed errors, and
the ``@NAME`` etcd endpoints lookup.

Everything goes through the official ``kubernetes`` client. Failures become
``KubernetesError`` (reachability, refusals) or ``InvalidArgument`` (bad
names, bad content of an object), each with one clear line.

Client configuration, first match wins: an explicit kubeconfig path, the
``KUBECONFIG`` environment variable, the in-cluster service account
(``KUBERNETES_SERVICE_HOST``), then ``~/.kube/config``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re

from coil.errors import InvalidArgument, KubernetesError

# Every request carries a timeout: (connect, read) seconds.
REQUEST_TIMEOUT = (5.0, 30.0)
ETCD_ENDPOINTS_NAMESPACE = "kube-system"
# Port names accepted when an Endpoints subset lists several ports.
ETCD_PORT_NAMES = ("etcd", "client", "etcd-client")

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def validate_object_name(name: str, what: str = "object") -> str:
    """A Kubernetes object name (DNS subdomain). Raises InvalidArgument."""
    if not isinstance(name, str) or not name or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use a DNS subdomain (lower-case letters, "
            f"digits, '-' and '.', at most 253 characters)")
    return name


def api_client(kubeconfig: str | None = None):
    """A configured ``kubernetes.client.ApiClient``. Raises KubernetesError."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException
    conf = client.Configuration()
    env_path = os.environ.get("KUBECONFIG") or None
    try:
        if kubeconfig:
            if not os.path.exists(kubeconfig):
                raise KubernetesError(f"kubeconfig {kubeconfig} does not exist")
            config.load_kube_config(config_file=kubeconfig, client_configuration=conf)
        elif env_path:
            # KUBECONFIG may list several files (merged by the client)
            if not any(os.path.exists(p) for p in env_path.split(os.pathsep) if p):
                raise KubernetesError(f"KUBECONFIG {env_path} does not exist")
            config.load_kube_config(client_configuration=conf)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=conf)
        else:
            default = os.path.expanduser("~/.kube/config")
            if not os.path.exists(default):
                raise KubernetesError(
                    "no Kubernetes configuration: not in a cluster and no kubeconfig",
                    hint="set KUBECONFIG or run inside a Pod with a service account")
            config.load_kube_config(config_file=default, client_configuration=conf)
    except ConfigException as exc:
        raise KubernetesError(f"invalid Kubernetes client configuration: "
                              f"{' '.join(str(exc).split())}") from None
    # urllib3 retries connection errors by itself 3 times by default; callers
    # do their own backoff, so keep the client's own retries short.
    conf.retries = 1
    return client.ApiClient(conf)


def core_api(api=None):
    """A CoreV1Api on ``api`` (an ApiClient, a CoreV1Api, or None: configure)."""
    from kubernetes import client
    if api is None:
        api = api_client()
    if isinstance(api, client.CoreV1Api):
        return api
    return client.CoreV1Api(api)


def is_api_exception(exc) -> bool:
    from kubernetes.client.exceptions import ApiException
    return isinstance(exc, ApiException)


def api_status(exc) -> int:
    """HTTP status of an ApiException (0 when the server was not reached)."""
    return int(getattr(exc, "status", 0) or 0)


def transient_errors() -> tuple:
    """Exception types that mean "the API server could not be reached" or a
    request failed and may succeed later."""
    import urllib3
    from kubernetes.client.exceptions import ApiException
    return (ApiException, urllib3.exceptions.HTTPError, OSError, TimeoutError)


def describe(exc) -> str:
    """One line for an API error (status, reason, message), for logs."""
    if is_api_exception(exc):
        status = api_status(exc)
        reason = " ".join(str(getattr(exc, "reason", "") or "").split())
        message = ""
        body = getattr(exc, "body", None)
        if body:
            try:
                import json
                message = json.loads(body).get("message", "")
            except (ValueError, AttributeError, TypeError):
                message = ""
        text = f"HTTP {status} {reason}".strip() if status else (reason or "no response")
        if message:
            text += f": {' '.join(str(message).split())}"
        return text
    try:
        import urllib3
        if isinstance(exc, urllib3.exceptions.MaxRetryError):
            pool = getattr(exc, "pool", None)
            where = f"{pool.scheme}://{pool.host}:{pool.port}" if pool is not None else "?"
            reason = " ".join(str(exc.reason or "").split())
            # "HTTPSConnection(host=..., port=...): Failed to establish ..." -> the cause
            reason = reason.split("): ", 1)[-1] if reason.startswith(("HTTP", "<")) else reason
            return f"no answer from {where}: {reason or 'connection failed'}"
    except ImportError:
        pass
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def to_coil_error(exc, what: str) -> KubernetesError:
    """An exception from the client -> KubernetesError naming ``what``."""
    status = api_status(exc) if is_api_exception(exc) else 0
    hint = None
    if status == 401:
        hint = "the API server rejected the credentials"
    elif status == 403:
        hint = "the service account lacks the RBAC permission; apply deploy/rbac.yaml"
    elif status == 0:
        hint = "check that the API server is reachable"
    err = KubernetesError(f"{what}: {describe(exc)}", hint=hint)
    err.status = status
    return err


# -- @NAME etcd endpoints ------------------------------------------------------
def parse_etcd_endpoints_object(obj: dict, name: str, secure: bool) -> tuple[str, ...]:
    """The etcd URLs from an Endpoints object (a dict as the API returns it).

    Every ready address of every subset, with the subset's port: the only
    port, or the one named etcd/client/etcd-client. Raises InvalidArgument.
    """
    where = f"Endpoints {ETCD_ENDPOINTS_NAMESPACE}/{name}"
    if not isinstance(obj, dict):
        raise InvalidArgument(f"invalid {where}: not an object")
    subsets = obj.get("subsets") or []
    if not isinstance(subsets, list) or not subsets:
        raise InvalidArgument(f"invalid {where}: it has no subsets (no etcd address)",
                              hint="list the etcd servers under subsets[].addresses")
    scheme = "https" if secure else "http"
    urls: list[str] = []
    for i, subset in enumerate(subsets):
        if not isinstance(subset, dict):
            raise InvalidArgument(f"invalid {where}: subsets[{i}] is not an object")
        ports = subset.get("ports") or []
        if not isinstance(ports, list) or not ports:
            raise InvalidArgument(f"invalid {where}: subsets[{i}] has no port")
        if len(ports) == 1:
            port = ports[0]
        else:
            named = [p for p in ports if isinstance(p, dict) and p.get("name") in ETCD_PORT_NAMES]
            if len(named) != 1:
                raise InvalidArgument(
                    f"invalid {where}: subsets[{i}] has {len(ports)} ports; name exactly one "
                    f"of them {' or '.join(ETCD_PORT_NAMES)}")
            port = named[0]
        if not isinstance(port, dict):
            raise InvalidArgument(f"invalid {where}: subsets[{i}] has a malformed port")
        number = port.get("port")
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
            raise InvalidArgument(f"invalid {where}: subsets[{i}] port {number!r} is not 1..65535")
        protocol = port.get("protocol") or "TCP"
        if protocol != "TCP":
            raise InvalidArgument(f"invalid {where}: subsets[{i}] port protocol {protocol} "
                                  f"(etcd needs TCP)")
        addresses = subset.get("addresses") or []
        if not isinstance(addresses, list):
            raise InvalidArgument(f"invalid {where}: subsets[{i}].addresses is not a list")
        for j, entry in enumerate(addresses):
            raw = entry.get("ip") if isinstance(entry, dict) else None
            try:
                ip = ipaddress.ip_address(str(raw).strip()) if raw else None
            except ValueError:
                ip = None
            if ip is None:
                raise InvalidArgument(f"invalid {where}: subsets[{i}].addresses[{j}].ip "
                                      f"{raw!r} is not an IP address")
            host = f"[{ip}]" if ip.version == 6 else str(ip)
            url = f"{scheme}://{host}:{number}"
            if url not in urls:
                urls.append(url)
    if not urls:
        raise InvalidArgument(f"invalid {where}: no ready address in any subset",
                              hint="is etcd running? notReadyAddresses are not used")
    return tuple(urls)


def read_etcd_endpoints(name: str, api=None, secure: bool = False) -> tuple[str, ...]:
    """Read and validate ``kube-system/NAME``. Raises InvalidArgument, KubernetesError."""
    import json
    validate_object_name(name, "Endpoints")
    core = core_api(api)
    what = f"reading Endpoints {ETCD_ENDPOINTS_NAMESPACE}/{name}"
    try:
        resp = core.read_namespaced_endpoints(name, ETCD_ENDPOINTS_NAMESPACE,
                                              _preload_content=False,
                                              _request_timeout=REQUEST_TIMEOUT)
        try:
            body = resp.data
        finally:
            resp.release_conn()
    except transient_errors() as exc:
        if is_api_exception(exc) and api_status(exc) == 404:
            raise KubernetesError(f"Endpoints {ETCD_ENDPOINTS_NAMESPACE}/{name} does not exist",
                                  hint="create it with the etcd addresses "
                                       "(see deploy/etcd-endpoints.yaml)") from None
        raise to_coil_error(exc, what) from None
    try:
        obj = json.loads(body)
    except ValueError:
        raise KubernetesError(f"{what}: the API server sent invalid JSON") from None
    return parse_etcd_endpoints_object(obj, name, secure)


def resolve_etcd_endpoints(config, api=None):
    """``EtcdConfig`` with ``@NAME`` endpoints replaced by the addresses of
    the Endpoints object ``kube-system/NAME`` (https when a CA is configured).
    Configs without ``@`` are returned unchanged."""
    eps = tuple(config.endpoints)
    if not eps or not eps[0].startswith("@"):
        return config
    if len(eps) != 1:
        raise InvalidArgument(f"invalid etcd endpoints {','.join(eps)!r}: "
                              f"@NAME cannot be mixed with URLs")
    urls = read_etcd_endpoints(eps[0][1:], api, secure=bool(config.tls_ca))
    return dataclasses.replace(config, endpoints=urls)
