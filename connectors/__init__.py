"""Thin engine plugins over kdn.client: vLLM, SGLang, Hugging Face transformers."""
