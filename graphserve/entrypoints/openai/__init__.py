"""The OpenAI-compatible HTTP server (`graphserve serve`): FastAPI app, protocol models and endpoint handlers."""
