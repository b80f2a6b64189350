"""Everything that touches etcd.

``keys`` owns the key layout (mirrored by docs/schema.md), ``etcd`` the
client and its error translation, ``model`` the pools, blocks and addresses
(``IPAMStore``: every change one guarded transaction), ``liveness`` the
nodes' lease-bound liveness records, ``v1`` the detection and conversion of
a Coil v1 store.
"""

from coil.store.model import Address, Block, IPAMStore, Pool

__all__ = ["IPAMStore", "Pool", "Block", "Address"]
