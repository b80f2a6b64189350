"""Coil: IP address management and pod networking for bare-metal Kubernetes."""

__version__ = "2.0.0"


def launcher_path():
    """Path of the native ``hypercoil`` launcher if it was built, else None.

    The launcher serves the CNI plugin role without starting Python (it
    relays the request to coild over its UNIX socket) and execs Python for
    every other role.
    """
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fast", "hypercoil")
    return path if os.access(path, os.X_OK) else None
