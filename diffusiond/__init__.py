"""diffusiond: a gRPC text-to-image service for Stable-Diffusion-class models.

Importing this package (or ``diffusiond.client``) needs only grpcio, protobuf
and pillow; the inference stack (torch, diffusers, onnxruntime) is imported by
the modules that run models.
"""

__version__ = "0.1.0"
