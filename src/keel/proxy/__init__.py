"""Proxy training: the stdlib corpus, a small GPT family, and a trainer that uses `Guard` like any user."""

from keel.proxy.corpus import ProxyBatches, load_corpus
from keel.proxy.model import ProxyConfig, ProxyGPT, create_proxy_model, list_proxy_sizes
from keel.proxy.moe import MoeConfig, MoeMLP, MoeRouter, moe_loss

__all__ = [
    "MoeConfig",
    "MoeMLP",
    "MoeRouter",
    "ProxyBatches",
    "ProxyConfig",
    "ProxyGPT",
    "create_proxy_model",
    "list_proxy_sizes",
    "load_corpus",
    "moe_loss",
]
