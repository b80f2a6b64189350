"""coil-installer: installs coil and its CNI configuration on a node."""
