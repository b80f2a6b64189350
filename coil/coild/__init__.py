"""coild: the node daemon."""

# The root-only REST socket, next to the plugin's socket in /run/coild (the
# directory the DaemonSet mounts from the host).
DEFAULT_API_SOCKET = "/run/coild/api.sock"
