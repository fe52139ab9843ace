"""The service layer: what diffusiond does for a request, free of any transport.

Resolving a request against its model (``resolver``), the models a server has
loaded (``models``), the queue and continuous batcher (``batcher``), encoded
outputs and their cache (``outputs``, ``result_cache``), and the operations a
front door calls (``generation``). The gRPC server (and any other front door)
only converts messages and maps errors to statuses.
"""
