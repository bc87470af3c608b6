"""What KDN's bytes mean: chunk objects (``chunk``), their keys (``keys``), the model layout that scopes them
(``layout``), KV tensors <-> chunk objects through a codec (``chunk_codec``) and codec profile headers (``profile``).

Used by every side (client, node, controller); imports nothing above it.
"""
