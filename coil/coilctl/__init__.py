"""coilctl: the operator CLI."""
