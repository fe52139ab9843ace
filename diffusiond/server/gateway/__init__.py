"""The HTTP front door (``--http-port``): JSON, Server-Sent Events, the OpenAI images API and a web page.

It runs in the gRPC server's process and event loop and calls the same
``GenerationService``, so both front doors share one batcher, one queue, the
same tokens and per-client limits, and one error table (``server.status``).
"""
