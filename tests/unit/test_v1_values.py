"""Reading Coil v1's values and keys (coil/store/v1.py), without a server."""

from __future__ import annotations

import pytest

from coil.store import v1


@pytest.mark.parametrize("go, ours", [
    ("2024-05-06T07:08:09.123456789Z", "2024-05-06T07:08:09.123456Z"),
    ("2024-05-06T07:08:09Z", "2024-05-06T07:08:09.000000Z"),
    ("2024-05-06T07:08:09.5Z", "2024-05-06T07:08:09.500000Z"),
    ("2024-05-06T09:08:09.1+02:00", "2024-05-06T07:08:09.100000Z"),
    ("2024-05-06T01:38:09-05:30", "2024-05-06T07:08:09.000000Z"),
    ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000000Z"),       # Go's zero time
    ("", v1.EPOCH), (None, v1.EPOCH), ("yesterday", v1.EPOCH), ("2024-13-45T99:00:00Z", v1.EPOCH),
])
def test_go_time_to_iso(go, ours):
    assert v1.go_time_to_iso(go) == ours


def test_convert_address_value():
    rec, legacy = v1.convert_address_value(
        b'{"container_id":"abc","namespace":"ns","pod":"p","created_at":"2024-05-06T07:08:09Z"}')
    assert not legacy
    assert rec == {"container_id": "abc", "namespace": "ns", "pod": "p",
                   "created_at": "2024-05-06T07:08:09.000000Z"}
    rec, legacy = v1.convert_address_value(b"default/old-pod")      # v1.0.2 and older
    assert legacy and rec == {"container_id": "", "namespace": "default", "pod": "old-pod",
                              "created_at": v1.EPOCH}


@pytest.mark.parametrize("key, subnet, doc, ip", [
    ("subnet/10.64.0.0", True, False, False),
    ("subnet/fd00:100::", True, False, False),
    ("subnet/10.64.0.0/14", False, False, False),
    ("block/default/10.64.0.0", False, True, False),
    ("block/default/10.64.0.0/27", False, False, False),
    ("ip/10.64.0.0/5", False, False, True),
    ("ip/10.64.0.0/27/5", False, False, False),
    ("node-block/n1/10.64.0.0/27", False, False, False),
])
def test_v1_keys_are_told_apart_from_current_ones(key, subnet, doc, ip):
    assert (v1._v1_subnet_marker(key), v1._v1_block_doc(key), v1._v1_ip_key(key)) == \
        (subnet, doc, ip)
