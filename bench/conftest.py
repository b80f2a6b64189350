"""Benchmarks reuse the test suite's fixtures (a real etcd, key prefixes).

tests/conftest.py is loaded under its own module name: ``conftest`` in
sys.modules may be another directory's conftest.
"""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
pytest_plugins = ["kube", "strict"]  # kube_apiserver fixture; skips fail under COIL_STRICT=1

_ROOT_CONFTEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "tests", "conftest.py")
if "_coil_tests_root_conftest" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("_coil_tests_root_conftest", _ROOT_CONFTEST)
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    sys.modules["_coil_tests_root_conftest"] = _mod
_tests = sys.modules["_coil_tests_root_conftest"]

etcd_server = _tests.etcd_server
etcd_prefix = _tests.etcd_prefix
etcd_config = _tests.etcd_config
store = _tests.store
