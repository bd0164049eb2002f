"""What both faces share in front of the engine.

Each face (gRPC, the OpenAI HTTP API) turns its wire format into one
transport-neutral :class:`~llm_stream.front_door.request.RequestDraft` and has it
checked by :func:`~llm_stream.front_door.request.validate`, so both accept and
refuse the same requests with the same messages; :class:`Admission` is the one
authenticate -> hold -> release path and the one place a rejection is logged and
counted. Neither knows about protobuf, HTTP or torch.
"""
