"""The local multi-node sandbox: ``hypercoil sandbox up|status|check|down``.

``cli`` (commands), ``cluster`` (namespaces, fabric, processes, pods,
status and check), ``bird`` (BIRD configuration and birdc), ``state`` (the
state directory that lets ``down`` undo exactly what ``up`` made).
"""
