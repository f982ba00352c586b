"""Data plane and state plane shared by the node roles.

- `layout`: `KVLayout` descriptor, its hash, and the pairing check.
- `kv_codec`: gather a request's KV from a paged pool into the token-major wire layout,
  scatter it back (page sizes may differ between the two sides).
- `transport`: `KVTransport`, UCX (ucxx) messages keyed by string, synchronous-facing;
  `wire` (header format), `inbox` (receive bookkeeping) and `ucx_engine` (asyncio/UCX side)
  are its parts.
- `registry`, `rooms`, `sessions`: Redis records for live nodes, transfer rendezvous and
  request state, each key with a TTL (`redis_util` holds the atomic write helpers).

Import the submodules directly; this package imports nothing heavy on its own.
"""
