"""Text side: prompt templates and class lists, exact trimmed encoding, and the embedding cache."""
from .cache import EmbeddingCache
from .embed import cache_namespace, class_embeddings, compute_text_embeddings, default_cache, embed_texts
from .prompts import builtin_names, class_prompts, load_classes, load_templates

__all__ = [
    "EmbeddingCache",
    "builtin_names",
    "cache_namespace",
    "class_embeddings",
    "class_prompts",
    "compute_text_embeddings",
    "default_cache",
    "embed_texts",
    "load_classes",
    "load_templates",
]
