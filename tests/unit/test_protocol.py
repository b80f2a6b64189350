"""The relay protocol's one owner (coil/cni/protocol.py): framing round
trips, and coild and the plugin use its constants."""

from __future__ import annotations

import pytest

from coil.cni import plugin, protocol, service, spec


def test_request_round_trip_keeps_only_the_protocol_keys_in_order():
    env = {"CNI_PATH": "/opt/cni/bin", "CNI_COMMAND": "ADD", "HOME": "/root",
           "CNI_ARGS": "", "CNI_IFNAME": "eth\udcff0"}      # a non-UTF-8 byte, as os.environ has it
    frame = protocol.encode_request(env, b'{"x":1}\0tail')
    assert frame == (protocol.MAGIC + b"CNI_COMMAND=ADD\0CNI_IFNAME=eth\xff0\0CNI_ARGS=\0"
                     b"CNI_PATH=/opt/cni/bin\0\0" + b'{"x":1}\0tail')
    got, stdin = protocol.decode_request(frame)
    assert stdin == b'{"x":1}\0tail'
    assert got == {"CNI_COMMAND": "ADD", "CNI_IFNAME": "eth\ufffd0", "CNI_ARGS": "",
                   "CNI_PATH": "/opt/cni/bin"}


@pytest.mark.parametrize("frame", [b"", b"COIL2\nCNI_COMMAND=ADD\0\0{}",
                                   protocol.MAGIC + b"CNI_COMMAND=ADD"])
def test_malformed_request(frame):
    with pytest.raises(protocol.FrameError):
        protocol.decode_request(frame)


def test_unknown_keys_are_dropped_by_the_decoder():
    env, stdin = protocol.decode_request(protocol.MAGIC + b"EVIL=1\0CNI_NETNS=/x\0noeq\0\0{}")
    assert (env, stdin) == ({"CNI_NETNS": "/x"}, b"{}")


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_response_round_trip(code):
    assert protocol.decode_response(protocol.encode_response(code, b"{}\n")) == (code, b"{}\n")


@pytest.mark.parametrize("data", [b"", b"0", b"256\n", b"1234\n", b"-1\n", b" 0\n", b"\n{}"])
def test_malformed_response(data):
    assert protocol.decode_response(data) is None


def test_encode_response_refuses_codes_outside_a_byte():
    with pytest.raises(ValueError):
        protocol.encode_response(256, b"")


def test_one_owner():
    """spec, the plugin and coild's service take the protocol's objects, not copies."""
    assert spec.SUPPORTED_VERSIONS is protocol.SUPPORTED_VERSIONS
    assert plugin.DEFAULT_SOCKET is protocol.DEFAULT_SOCKET
    assert (plugin.CONNECT_TIMEOUT, plugin.RELAY_TIMEOUT) == (protocol.CONNECT_TIMEOUT,
                                                              protocol.RELAY_TIMEOUT)
    req = service.decode_frame(protocol.encode_request({"CNI_COMMAND": "DEL"}, b"{}"))
    assert (req.command, req.stdin) == ("DEL", b"{}")


def test_no_copy_of_a_protocol_value_in_the_python_code():
    """No module of the plugin's or coild's side spells a value protocol.py
    owns (the default CNI version of an answer, the default socket, the
    magic): a copy would drift when protocol.py changes. Conflists and the
    sandbox's CNI executor name CNI versions as configuration, not as the
    protocol, and are not scanned."""
    import ast
    import glob
    import os
    root = os.path.dirname(protocol.__file__)
    owned = {protocol.DEFAULT_CNI_VERSION, protocol.DEFAULT_SOCKET, protocol.MAGIC,
             protocol.MAGIC.decode()}
    copies = []
    for path in sorted(glob.glob(os.path.join(root, "*.py"))
                       + glob.glob(os.path.join(root, "..", "coild", "*.py"))):
        if os.path.samefile(path, protocol.__file__):
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        copies += [f"{os.path.relpath(path, root)}:{node.lineno}: {node.value!r}"
                   for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and node.value in owned]
    assert copies == []
