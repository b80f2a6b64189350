"""coild: the node daemon."""

# The root-only REST socket, next to the plugin's socket in /run/coild (the
# directory the DaemonSet mounts from the host).
DEFAULT_API_SOCKET = "/run/coild/api.sock"

# The deletion queue's flush triggers (coil.coild.teardown, --teardown-batch and
# --teardown-delay): this many retired pod veths, or this many seconds after
# the oldest of them. docs/benchmarks.md "Batch size, measured again" says why 16.
TEARDOWN_BATCH = 16
TEARDOWN_DELAY = 0.1
