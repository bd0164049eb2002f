"""The OpenAI-compatible HTTP API (and the chat page), served beside gRPC.

Same process, same event loop, same engine, admission and metrics as the gRPC
service: uvicorn runs inside the server's loop (:mod:`.server`), starlette routes
(:mod:`.app`) turn OpenAI request bodies into the contract's ``PredictRequest``
(:mod:`.openai_schema`) and validate them through the gRPC side's own conversion,
and one table (:mod:`.errors`) maps domain errors to HTTP statuses and OpenAI's
error shape. Nothing here imports torch.
"""
