from nemolite.model.decoder import CausalLM
from nemolite.model.kv_cache import KVCache

__all__ = ["CausalLM", "KVCache"]
