"""Serving LLaDA-MoE: a Ray Serve application with an OpenAI-compatible HTTP API.

- ``config``: the serve config (strict pydantic, YAML), embeddable in a recipe.
- ``protocol``: OpenAI request/response bodies, diffusion parameters as extra fields.
- ``validation``: model name, sampling parameters, prompts -> SampleRequests (plain functions).
- ``batching``: which requests share a batch, padding, sampling a group, block streaming.
- ``text``: committed tokens -> streamed text (stop tokens, stop strings, UTF-8).
- ``api``: the FastAPI app over a sampler backend.
- ``sampler`` / ``app``: the Ray Serve deployments and the application builder.
- ``cli``: ``llada serve`` / ``python -m serve``.

Only ``config`` is imported here, so that a recipe can embed the serve config without Ray.
"""

from serve.config import AppArgs, ServeConfig, load_serve_config

__all__ = ["AppArgs", "ServeConfig", "load_serve_config"]
