"""Coil v1's coilctl settings (cybozu-go/etcdutil through viper): the
environment names ``COILCTL_ENDPOINTS``, ``COILCTL_TLS_CA_FILE`` ... and the
config-file keys ``tls-ca-file`` ... and inline PEM, next to the current
names; the current name wins when both are set."""

from __future__ import annotations

import os
import stat

import pytest

from coil import config as cfg
from coil.config import EtcdConfig, resolve
from coil.errors import InvalidArgument

ENV = "COILCTL_ETCD_"
V1 = "COILCTL_"
NO_FLAGS = {field: None for field in cfg.FIELDS}
PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----"


def write(tmp_path, text, name="coilctl.yml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_v1_environment_names(tls_files):
    env = {"COILCTL_ENDPOINTS": "http://v1a:2379,http://v1b:2379", "COILCTL_PREFIX": "/v1/",
           "COILCTL_TIMEOUT": "2s", "COILCTL_USERNAME": "u", "COILCTL_PASSWORD": "p",
           "COILCTL_TLS_CA_FILE": tls_files["ca"], "COILCTL_TLS_CERT_FILE": tls_files["cert"],
           "COILCTL_TLS_KEY_FILE": tls_files["key"]}
    c = resolve(NO_FLAGS, ENV, None, environ=env, v1_env_prefix=V1)
    assert c == EtcdConfig(endpoints=("http://v1a:2379", "http://v1b:2379"), prefix="/v1/",
                           timeout=2.0, username="u", password="p", tls_ca=tls_files["ca"],
                           tls_cert=tls_files["cert"], tls_key=tls_files["key"])


def test_v1_environment_is_read_only_when_asked():
    env = {"COILCTL_PREFIX": "/v1/"}
    assert resolve(NO_FLAGS, ENV, None, environ=env).prefix == "/coil/"        # coild etc.
    assert resolve(NO_FLAGS, ENV, None, environ=env, v1_env_prefix=V1).prefix == "/v1/"


def test_v1_endpoints_separated_by_spaces():
    # viper turned an environment string into a list by splitting on spaces
    env = {"COILCTL_ENDPOINTS": "http://a:1 http://b:2"}
    c = resolve(NO_FLAGS, ENV, None, environ=env, v1_env_prefix=V1)
    assert c.endpoints == ("http://a:1", "http://b:2")


@pytest.mark.parametrize("field", ["endpoints", "prefix", "timeout"])
def test_current_environment_name_wins_over_v1(field):
    values = {"endpoints": ("http://new:1", "http://old:1", ("http://new:1",)),
              "prefix": ("/new/", "/old/", "/new/"), "timeout": ("3s", "9s", 3.0)}[field]
    env = {ENV + field.upper(): values[0], V1 + field.upper(): values[1]}
    assert getattr(resolve(NO_FLAGS, ENV, None, environ=env, v1_env_prefix=V1), field) == values[2]


def test_flag_wins_over_v1_environment_which_wins_over_file(tmp_path):
    path = write(tmp_path, "prefix: /file/\n")
    env = {"COILCTL_PREFIX": "/v1env/"}
    assert resolve(NO_FLAGS, ENV, path, environ=env, v1_env_prefix=V1).prefix == "/v1env/"
    assert resolve(dict(NO_FLAGS, prefix="/flag/"), ENV, path, environ=env,
                   v1_env_prefix=V1).prefix == "/flag/"


def test_v1_file_keys(tmp_path, tls_files):
    path = write(tmp_path, f"endpoints: [http://f:2379]\ntls-ca-file: {tls_files['ca']}\n"
                           f"tls-cert-file: {tls_files['cert']}\ntls-key-file: {tls_files['key']}\n")
    c = resolve(NO_FLAGS, ENV, path, environ={})
    assert (c.tls_ca, c.tls_cert, c.tls_key) == (tls_files["ca"], tls_files["cert"], tls_files["key"])


def test_current_file_key_wins_over_v1_key(tmp_path, tls_files):
    other = tmp_path / "other.pem"
    other.write_text("x\n")
    path = write(tmp_path, f"tls-ca: {other}\ntls-ca-file: {tls_files['ca']}\n")
    assert resolve(NO_FLAGS, ENV, path, environ={}).tls_ca == str(other)


def test_inline_pem_in_the_file_becomes_a_private_file(tmp_path):
    key_pem = PEM.replace("CERTIFICATE", "PRIVATE KEY")
    indented = "\n".join("  " + line for line in PEM.splitlines())
    indented_key = "\n".join("  " + line for line in key_pem.splitlines())
    path = write(tmp_path, f"tls-ca: |\n{indented}\ntls-cert: |\n{indented}\n"
                           f"tls-key: |\n{indented_key}\n")
    c = resolve(NO_FLAGS, ENV, path, environ={})
    for got, want in ((c.tls_ca, PEM), (c.tls_cert, PEM), (c.tls_key, key_pem)):
        assert got and os.path.isfile(got) and got != path
        with open(got, encoding="utf-8") as f:
            assert f.read() == want + "\n"
        assert stat.S_IMODE(os.stat(got).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(got)).st_mode) == 0o700


def test_inline_pem_in_v1_environment():
    env = {"COILCTL_TLS_CA": PEM}
    c = resolve(NO_FLAGS, ENV, None, environ=env, v1_env_prefix=V1)
    with open(c.tls_ca, encoding="utf-8") as f:
        assert f.read().startswith("-----BEGIN CERTIFICATE-----")


def test_v1_file_path_name_preferred_over_v1_inline_name_in_env(tls_files):
    env = {"COILCTL_TLS_CA_FILE": tls_files["ca"], "COILCTL_TLS_CA": PEM}
    assert resolve(NO_FLAGS, ENV, None, environ=env, v1_env_prefix=V1).tls_ca == tls_files["ca"]


def test_v1_names_are_validated_like_the_current_ones(tmp_path):
    with pytest.raises(InvalidArgument, match="/nonexistent/ca.pem"):
        resolve(NO_FLAGS, ENV, None, environ={"COILCTL_TLS_CA_FILE": "/nonexistent/ca.pem"},
                v1_env_prefix=V1)
    with pytest.raises(InvalidArgument, match="ftp://x:1"):
        resolve(NO_FLAGS, ENV, None, environ={"COILCTL_ENDPOINTS": "ftp://x:1"}, v1_env_prefix=V1)
    path = write(tmp_path, "tls-ca-files: /x\n")
    with pytest.raises(InvalidArgument, match="'tls-ca-files'"):
        resolve(NO_FLAGS, ENV, path, environ={})
