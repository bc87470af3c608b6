"""How KDN's bytes move: gRPC helpers and error mapping (``rpc``), tokens and roles (``auth``), the bulk TCP
channel (``bulk``) and the same-host shared-memory protocol (``shm``). Knows nothing of tiers, clients or the
controller."""
