"""Generated protobuf and gRPC code for ``protos/diffusiond/v1``.

Regenerate with ``make proto``; ``tests/test_api_codegen.py`` fails when these
files differ from what the ``.proto`` files produce.
"""
