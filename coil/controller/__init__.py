"""coil-controller: frees blocks of deleted Nodes and finds leaked addresses."""
