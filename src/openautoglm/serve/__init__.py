"""OpenAI-compatible HTTP server over the continuous-batching scheduler (``openautoglm serve``)."""
