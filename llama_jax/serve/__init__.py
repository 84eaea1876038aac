"""Serving: the continuous-batching engine (`engine`) and the OpenAI-compatible HTTP app
(`app`, needs the `serve` extra)."""
