"""KV caches for search: a paged block pool with copy-on-write forks (:class:`PagedKVCache`)."""
from .paged import CacheError, PagedKVCache

__all__ = ["CacheError", "PagedKVCache"]
