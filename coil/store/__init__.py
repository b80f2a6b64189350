"""Everything that touches etcd.

``keys`` owns the key layout (mirrored by docs/schema.md), ``etcd`` the
client and its error translation, ``pools``/``blocks``/``addresses`` the
guarded transactions. ``IPAMStore`` bundles them for callers.
"""

from coil.store.model import Address, Block, IPAMStore, Pool

__all__ = ["IPAMStore", "Pool", "Block", "Address"]
