"""KDN for vLLM: an out-of-tree v1 KV connector (see ``docs/connectors/vllm.md``).

``connectors.vllm.connector.KDNConnector`` is the class vLLM loads (it imports vLLM and checks its version);
the rest — :mod:`~connectors.vllm.config`, :mod:`~connectors.vllm.plan` (scheduler bookkeeping),
:mod:`~connectors.vllm.paged` (paged CPU cache layout), :mod:`~connectors.vllm.worker` (loads and stores) — is
plain Python over ``kdn.client`` and torch, importable without vLLM. :mod:`~connectors.vllm.driver` runs prompts
through a real vLLM engine (tests and ``kdn bench connectors``).
"""

#: vLLM versions the connector is written against: ``[min, max)``.
SUPPORTED_VLLM = ("0.32.0", "0.33.0")

__all__ = ["SUPPORTED_VLLM"]
