"""coild: the node daemon."""
