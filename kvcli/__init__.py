"""kvcli: ask questions of long documents with a local LLM and a compressed, reusable KV cache."""

__version__ = "0.1.0"
