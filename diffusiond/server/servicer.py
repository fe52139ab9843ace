"""The gRPC servicer: protobuf in -> service -> protobuf out.

It owns no algorithm, no error policy and no bookkeeping: the codec converts
messages, the service layer does the work, and the interceptor tracks calls
and turns exceptions into statuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from diffusiond.api.v1 import diffusion_pb2 as pb
from diffusiond.api.v1 import diffusion_pb2_grpc as pb_grpc
from diffusiond.errors import shown
from diffusiond.server import codec
from diffusiond.server.interceptor import ANONYMOUS, current_call
from diffusiond.service.generation import GenerationService, deadline_in
from diffusiond.service.resolver import GenerationParams


class DiffusionServicer(pb_grpc.DiffusionServicer):
    def __init__(self, service: GenerationService) -> None:
        self.service = service

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        params = _params(request, context)
        result = await self.service.generate(params, deadline_in(context.time_remaining()))
        return codec.response_to_proto(result)

    async def StreamProgress(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProgressEvent]:
        params = _params(request, context)
        async for event in self.service.stream(params, deadline_in(context.time_remaining())):
            yield codec.event_to_proto(params.request_id, event)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[codec.model_info(m, default) for m, default in self.service.models()])


def _params(request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> GenerationParams:
    """The request's parameters, its id first (from the field or call metadata), so errors name it."""
    call = current_call.get()
    call.request_id = shown(request.request_id) if request.request_id else "-"  # until it is checked
    request_id = codec.request_id_of(request, context.invocation_metadata() or ())
    call.request_id = request_id
    params = codec.params_from_proto(request, request_id)
    return params if call.client == ANONYMOUS else replace(params, client=call.client)
