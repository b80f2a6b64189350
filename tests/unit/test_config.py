"""etcd connection settings: flags > environment > config file > defaults,
durations, and rejection of bad values with a message naming them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from coil import config as cfg
from coil.config import EtcdConfig, parse_duration, resolve
from coil.errors import CoilError, InvalidArgument

ENV = "COILCTL_ETCD_"
NO_FLAGS = {field: None for field in cfg.FIELDS}


def flags(**given):
    return dict(NO_FLAGS, **given)


def write_yaml(tmp_path, text: str, name: str = "coilctl.yml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- defaults ------------------------------------------------------------------

def test_defaults_when_nothing_is_given(tmp_path):
    missing = str(tmp_path / "nope.yml")
    c = resolve(NO_FLAGS, ENV, missing, environ={})
    assert c == EtcdConfig()
    assert c.endpoints == ("http://127.0.0.1:2379",)
    assert c.prefix == "/coil/"
    assert c.timeout == 5.0
    assert c.username is None and c.password is None
    assert c.tls_ca is None and c.tls_cert is None and c.tls_key is None


def test_no_config_file_at_all():
    assert resolve({}, ENV, None, environ={}) == EtcdConfig()


def test_environment_is_read_from_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("COILCTL_ETCD_PREFIX", "/from-os-env/")
    assert resolve(NO_FLAGS, ENV).prefix == "/from-os-env/"


# -- each source on its own ---------------------------------------------------

def test_config_file_keys(tmp_path, tls_files):
    path = write_yaml(tmp_path, f"""
endpoints: http://10.0.0.1:2379,http://10.0.0.2:2379
prefix: /file/
timeout: 7s
username: alice
password: secret
tls-ca: {tls_files['ca']}
tls-cert: {tls_files['cert']}
tls-key: {tls_files['key']}
""")
    c = resolve(NO_FLAGS, ENV, path, environ={})
    assert c == EtcdConfig(endpoints=("http://10.0.0.1:2379", "http://10.0.0.2:2379"),
                           prefix="/file/", timeout=7.0, username="alice", password="secret",
                           tls_ca=tls_files["ca"], tls_cert=tls_files["cert"],
                           tls_key=tls_files["key"])


def test_config_file_endpoints_as_yaml_list(tmp_path):
    path = write_yaml(tmp_path, "endpoints:\n  - http://a.example:2379\n  - https://b.example:2379\n")
    c = resolve(NO_FLAGS, ENV, path, environ={})
    assert c.endpoints == ("http://a.example:2379", "https://b.example:2379")


def test_config_file_may_be_json(tmp_path):
    path = write_yaml(tmp_path, json.dumps({"endpoints": ["http://j.example:2379"],
                                            "prefix": "/json/", "timeout": 3}),
                      name="coilctl.json")
    c = resolve(NO_FLAGS, ENV, path, environ={})
    assert c.endpoints == ("http://j.example:2379",)
    assert c.prefix == "/json/"
    assert c.timeout == 3.0


def test_empty_config_file_means_defaults(tmp_path):
    path = write_yaml(tmp_path, "")
    assert resolve(NO_FLAGS, ENV, path, environ={}) == EtcdConfig()


def test_config_file_with_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_yaml(tmp_path, "prefix: /home-file/\n", name=".coilctl.yml")
    assert resolve(NO_FLAGS, ENV, "~/.coilctl.yml", environ={}).prefix == "/home-file/"


def test_environment_variables(tls_files):
    env = {
        "COILCTL_ETCD_ENDPOINTS": "http://env1:2379, http://env2:2380",
        "COILCTL_ETCD_PREFIX": "/env/",
        "COILCTL_ETCD_TIMEOUT": "1m",
        "COILCTL_ETCD_USERNAME": "bob",
        "COILCTL_ETCD_PASSWORD": "pw",
        "COILCTL_ETCD_TLS_CA": tls_files["ca"],
        "COILCTL_ETCD_TLS_CERT": tls_files["cert"],
        "COILCTL_ETCD_TLS_KEY": tls_files["key"],
    }
    c = resolve(NO_FLAGS, ENV, None, environ=env)
    assert c == EtcdConfig(endpoints=("http://env1:2379", "http://env2:2380"), prefix="/env/",
                           timeout=60.0, username="bob", password="pw",
                           tls_ca=tls_files["ca"], tls_cert=tls_files["cert"],
                           tls_key=tls_files["key"])


def test_environment_prefix_is_per_role():
    env = {"COILD_ETCD_PREFIX": "/coild/", "COILCTL_ETCD_PREFIX": "/ctl/"}
    assert resolve(NO_FLAGS, "COILD_ETCD_", None, environ=env).prefix == "/coild/"
    assert resolve(NO_FLAGS, ENV, None, environ=env).prefix == "/ctl/"


def test_flags():
    c = resolve(flags(endpoints="http://flag:2379", prefix="/flag/", timeout="500ms",
                      username="u", password="p"), ENV, None, environ={})
    assert c == EtcdConfig(endpoints=("http://flag:2379",), prefix="/flag/", timeout=0.5,
                           username="u", password="p")


# -- precedence ---------------------------------------------------------------

@pytest.mark.parametrize("field,file_value,env_value,flag_value,expected", [
    ("endpoints", "http://file:2379", "http://env:2379", "http://flag:2379", ("http://flag:2379",)),
    ("prefix", "/file/", "/env/", "/flag/", "/flag/"),
    ("timeout", "10s", "20s", "30s", 30.0),
])
def test_flag_beats_env_beats_file(tmp_path, field, file_value, env_value, flag_value, expected):
    path = write_yaml(tmp_path, f"{cfg.FIELDS[field][1]}: {file_value}\n")
    env = {ENV + field.upper(): env_value}
    # flag > env > file
    assert getattr(resolve(flags(**{field: flag_value}), ENV, path, environ=env), field) == expected
    # env > file
    from_env = getattr(resolve(NO_FLAGS, ENV, path, environ=env), field)
    from_file = getattr(resolve(NO_FLAGS, ENV, path, environ={}), field)
    assert from_env != from_file
    assert from_env == getattr(resolve(flags(**{field: env_value}), ENV, None, environ={}), field)
    assert from_file == getattr(resolve(flags(**{field: file_value}), ENV, None, environ={}), field)
    # file > default
    assert from_file != getattr(EtcdConfig(), field)


def test_sources_are_merged_field_by_field(tmp_path):
    path = write_yaml(tmp_path, "endpoints: http://file:2379\nprefix: /file/\n"
                                "username: fileuser\npassword: filepw\ntimeout: 9s\n")
    env = {"COILCTL_ETCD_PREFIX": "/env/", "COILCTL_ETCD_PASSWORD": "envpw"}
    c = resolve(flags(timeout="2s"), ENV, path, environ=env)
    assert c.endpoints == ("http://file:2379",)   # file only
    assert c.prefix == "/env/"                    # env over file
    assert c.username == "fileuser"               # file only
    assert c.password == "envpw"                  # env over file
    assert c.timeout == 2.0                       # flag over file


def test_credentials_and_tls_precedence(tmp_path, tls_files):
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_text("x\n")
    path = write_yaml(tmp_path, f"username: fu\npassword: fp\ntls-ca: {tls_files['ca']}\n")
    env = {"COILCTL_ETCD_USERNAME": "eu", "COILCTL_ETCD_PASSWORD": "ep"}
    c = resolve(flags(tls_ca=str(other_ca)), ENV, path, environ=env)
    assert (c.username, c.password) == ("eu", "ep")
    assert c.tls_ca == str(other_ca)


def test_flag_given_as_empty_string_is_still_a_flag(tmp_path):
    # None means "not given"; an empty endpoint list is an error, not a fallback.
    with pytest.raises(InvalidArgument):
        resolve(flags(endpoints=""), ENV, None, environ={"COILCTL_ETCD_ENDPOINTS": "http://e:1"})


# -- normalisation --------------------------------------------------------------

def test_prefix_gets_a_trailing_slash():
    assert resolve(flags(prefix="/coil"), ENV, None, environ={}).prefix == "/coil/"
    assert resolve(flags(prefix="/"), ENV, None, environ={}).prefix == "/"


def test_endpoints_are_split_and_trimmed():
    c = resolve(flags(endpoints=" http://a:1 ,, https://b:2 "), ENV, None, environ={})
    assert c.endpoints == ("http://a:1", "https://b:2")


def test_kubernetes_endpoints_name_is_kept():
    assert resolve(flags(endpoints="@coil-etcd"), ENV, None, environ={}).endpoints == ("@coil-etcd",)


# -- durations --------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [
    ("10m", 600.0), ("1h30m", 5400.0), ("500ms", 0.5), ("30", 30.0), ("30s", 30.0),
    ("1.5s", 1.5), ("2d", 172800.0), ("1h1m1s", 3661.0), ("0", 0.0), (" 10m ", 600.0),
    ("1m500ms", 60.5), ("0.25", 0.25), (7, 7.0), (2.5, 2.5),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "", "   ", "abc", "10x", "m", "1h30", "-5s", "-5", "5 s", "1..5s", "1.5.2s", "h1",
    "10mm", "nan", "inf", "1e400", "10M", "ms",
])
def test_parse_duration_rejects(text):
    with pytest.raises(InvalidArgument) as info:
        parse_duration(text, "scan interval")
    msg = str(info.value)
    assert repr(text) in msg
    assert "scan interval" in msg
    assert "\n" not in info.value.one_line()


@pytest.mark.parametrize("value", [-1, -0.5, float("nan"), float("inf")])
def test_parse_duration_rejects_bad_numbers(value):
    with pytest.raises(InvalidArgument) as info:
        parse_duration(value)
    assert repr(value) in str(info.value)


def test_invalid_argument_is_a_coil_error():
    with pytest.raises(CoilError):
        parse_duration("bogus")


# -- rejected values -----------------------------------------------------------

@pytest.mark.parametrize("value,named", [
    ("ftp://host:2379", "ftp://host:2379"),
    ("localhost:2379", "localhost:2379"),
    ("http://:2379", "http://:2379"),
    ("http://host:abc", "http://host:abc"),
    ("http://host:99999", "http://host:99999"),
    ("http://ok:2379,tcp://bad:1", "tcp://bad:1"),
    ("", "''"),
    (" , ", "' , '"),
    ("@coil-etcd,http://a:1", "@coil-etcd,http://a:1"),
])
def test_bad_endpoints_rejected(value, named):
    with pytest.raises(InvalidArgument) as info:
        resolve(flags(endpoints=value), ENV, None, environ={})
    assert named in str(info.value)
    assert "endpoint" in str(info.value)


def test_bad_endpoints_from_env_and_file_rejected(tmp_path):
    with pytest.raises(InvalidArgument, match="ftp://env"):
        resolve(NO_FLAGS, ENV, None, environ={"COILCTL_ETCD_ENDPOINTS": "ftp://env:1"})
    path = write_yaml(tmp_path, "endpoints: ftp://file:1\n")
    with pytest.raises(InvalidArgument, match="ftp://file"):
        resolve(NO_FLAGS, ENV, path, environ={})


@pytest.mark.parametrize("value", ["coil/", "coil", "", "./coil/"])
def test_bad_prefix_rejected(value):
    with pytest.raises(InvalidArgument) as info:
        resolve(flags(prefix=value), ENV, None, environ={})
    assert repr(value) in str(info.value)
    assert "prefix" in str(info.value)


@pytest.mark.parametrize("value", ["abc", "0", "0s", "-1s", "10x", "nan", "1h30"])
def test_bad_timeout_rejected(value):
    with pytest.raises(InvalidArgument) as info:
        resolve(flags(timeout=value), ENV, None, environ={})
    assert repr(value) in str(info.value)
    assert "timeout" in str(info.value)


def test_bad_timeout_from_env_rejected():
    with pytest.raises(InvalidArgument, match="'soon'"):
        resolve(NO_FLAGS, ENV, None, environ={"COILCTL_ETCD_TIMEOUT": "soon"})


def test_unknown_file_key_rejected(tmp_path):
    path = write_yaml(tmp_path, "endpoints: http://a:1\nendpionts: http://typo:1\n")
    with pytest.raises(InvalidArgument) as info:
        resolve(NO_FLAGS, ENV, path, environ={})
    assert "'endpionts'" in str(info.value)
    assert path in str(info.value)


def test_flag_name_as_file_key_rejected(tmp_path):
    # The file uses "tls-ca", not the flag name nor the field name.
    path = write_yaml(tmp_path, "tls_ca: /x\n")
    with pytest.raises(InvalidArgument, match="'tls_ca'"):
        resolve(NO_FLAGS, ENV, path, environ={})


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_config_file_not_a_mapping_rejected(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(InvalidArgument) as info:
        resolve(NO_FLAGS, ENV, path, environ={})
    assert path in str(info.value)


def test_config_file_bad_yaml_rejected(tmp_path):
    path = write_yaml(tmp_path, "endpoints: [http://a:1\nprefix: /x/\n")
    with pytest.raises(InvalidArgument) as info:
        resolve(NO_FLAGS, ENV, path, environ={})
    assert path in str(info.value)
    assert "\n" not in str(info.value)


def test_config_file_unreadable_rejected(tmp_path):
    directory = tmp_path / "a-directory.yml"
    directory.mkdir()
    with pytest.raises(InvalidArgument) as info:
        resolve(NO_FLAGS, ENV, str(directory), environ={})
    assert str(directory) in str(info.value)


def test_missing_tls_file_rejected(tmp_path):
    missing = str(tmp_path / "no-ca.pem")
    with pytest.raises(InvalidArgument) as info:
        resolve(flags(tls_ca=missing), ENV, None, environ={})
    assert missing in str(info.value)
    assert "--etcd-tls-ca" in str(info.value)


def test_username_without_password_rejected():
    with pytest.raises(InvalidArgument, match="--etcd-password"):
        resolve(flags(username="root"), ENV, None, environ={})
    with pytest.raises(InvalidArgument, match="--etcd-username"):
        resolve(NO_FLAGS, ENV, None, environ={"COILCTL_ETCD_PASSWORD": "pw"})


def test_tls_cert_without_key_rejected(tls_files):
    with pytest.raises(InvalidArgument, match="--etcd-tls-key"):
        resolve(flags(tls_cert=tls_files["cert"]), ENV, None, environ={})


def test_config_is_immutable():
    c = EtcdConfig()
    with pytest.raises(Exception):
        c.prefix = "/other/"  # type: ignore[misc]


def test_every_field_has_a_flag_and_a_file_key():
    names = {f.name for f in dataclasses.fields(EtcdConfig)}
    assert set(cfg.FIELDS) == names | {"password_file"}   # read into password
    for field, (flag, key) in cfg.FIELDS.items():
        assert flag == "--etcd-" + field.replace("_", "-")
        assert key == field.replace("_", "-")


# -- the password from a file ----------------------------------------------------

@pytest.fixture
def secret_file(tmp_path):
    p = tmp_path / "etcd-password"
    p.write_text("s3cret\n")              # `echo s3cret > file`: one newline dropped
    return str(p)


def test_password_file_from_flag_env_and_config_file(tmp_path, secret_file):
    c = resolve(flags(username="u", password_file=secret_file), ENV, None, environ={})
    assert (c.username, c.password) == ("u", "s3cret")
    env = {"COILCTL_ETCD_USERNAME": "u", "COILCTL_ETCD_PASSWORD_FILE": secret_file}
    assert resolve(NO_FLAGS, ENV, None, environ=env).password == "s3cret"
    path = write_yaml(tmp_path, f"username: u\npassword-file: {secret_file}\n")
    assert resolve(NO_FLAGS, ENV, path, environ={}).password == "s3cret"
    assert "s3cret" not in repr(flags(password_file=secret_file))


def test_password_and_its_file_are_one_setting(tmp_path, secret_file):
    # a higher source wins whichever of the two it gives
    env = {"COILCTL_ETCD_USERNAME": "u", "COILCTL_ETCD_PASSWORD": "envpw"}
    assert resolve(flags(password_file=secret_file), ENV, None, environ=env).password == "s3cret"
    env = {"COILCTL_ETCD_USERNAME": "u", "COILCTL_ETCD_PASSWORD_FILE": secret_file}
    assert resolve(flags(password="flagpw"), ENV, None, environ=env).password == "flagpw"
    # one source giving both is ambiguous
    with pytest.raises(InvalidArgument, match="--etcd-password-file"):
        resolve(flags(username="u", password="p", password_file=secret_file), ENV, None,
                environ={})


@pytest.mark.parametrize("content,word", [(b"", "empty"), (b"\n", "empty"),
                                          (b"\xff\xfe", "UTF-8"), (b"x" * 70000, "64 KiB")])
def test_bad_password_file_rejected(tmp_path, content, word):
    p = tmp_path / "pw"
    p.write_bytes(content)
    with pytest.raises(InvalidArgument, match=word) as info:
        resolve(flags(username="u", password_file=str(p)), ENV, None, environ={})
    assert str(p) in str(info.value)


def test_missing_password_file_named(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(InvalidArgument, match="cannot read --etcd-password-file .*nope"):
        resolve(flags(username="u", password_file=missing), ENV, None, environ={})


def test_every_role_takes_the_password_file(secret_file):
    from coil.coilctl.cli import cli as coilctl
    from coil.coild.main import cli as coild
    from coil.controller.main import cli as controller
    for command in (coild, controller, coilctl):
        params = {p.name for p in command.params}
        assert "etcd_password_file" in params, command.name


def test_endpoints_given_by_any_source_or_none(tmp_path):
    """``coilctl smoke`` checks pools only when etcd is configured somewhere."""
    flags = {"endpoints": None}
    missing = str(tmp_path / "none.yml")
    assert not cfg.endpoints_given(flags, "COILCTL_ETCD_", missing, environ={},
                                   v1_env_prefix="COILCTL_")
    assert cfg.endpoints_given({"endpoints": "http://127.0.0.1:2379"}, "COILCTL_ETCD_", missing,
                               environ={})
    assert cfg.endpoints_given(flags, "COILCTL_ETCD_", missing,
                               environ={"COILCTL_ETCD_ENDPOINTS": "http://e:2379"})
    assert cfg.endpoints_given(flags, "COILCTL_ETCD_", missing,
                               environ={"COILCTL_ENDPOINTS": "http://e:2379"},
                               v1_env_prefix="COILCTL_")
    assert not cfg.endpoints_given(flags, "COILCTL_ETCD_", missing,
                                   environ={"COILCTL_ENDPOINTS": "http://e:2379"})
    f = tmp_path / "c.yml"
    f.write_text("prefix: /x/\n")
    assert not cfg.endpoints_given(flags, "COILCTL_ETCD_", str(f), environ={})
    f.write_text("endpoints: http://e:2379\n")
    assert cfg.endpoints_given(flags, "COILCTL_ETCD_", str(f), environ={})
