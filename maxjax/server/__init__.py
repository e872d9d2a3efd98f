"""`maxjax serve`: an OpenAI-compatible HTTP server whose schedulers drive the pipelines.

Layout: ``openai_protocol`` (request bodies -> protocol requests), ``scheduler`` (one thread per model:
continuous batching over ``next_token`` / ``encode`` / ``next_chunk``), ``responses`` (OpenAI bodies and
SSE chunks), ``metrics`` (Prometheus), ``models`` (what ``--model`` loads), ``app`` (the FastAPI routes).
Needs the ``serve`` extra (``pip install maxjax[serve]``): FastAPI, uvicorn, prometheus-client.
"""
