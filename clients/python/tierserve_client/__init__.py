"""The tierserve Python client SDK, sync and asyncio.

from tierserve_client import ChatMessage, Client, ClientOptions, GenerateParams

with Client(ClientOptions("127.0.0.1:50051")) as client:
    stream = client.stream("The capital of France is", GenerateParams(max_new_tokens=16))
    for token in stream:
        print(token.text, f"{token.latency_ms:.1f} ms")
    print(stream.summary)

    # A conversation instead of a prompt: the model's chat template renders it on the worker.
    reply = client.generate(
        [ChatMessage.system("Answer in one sentence."), ChatMessage.user("What is the capital of France?")]
    )
    print(reply.text)
"""

from tierserve_client.aio import AsyncClient, AsyncTokenStream
from tierserve_client.client import Client, TokenStream
from tierserve_client.options import NO_RETRIES, ClientOptions, RetryPolicy
from tierserve_client.types import ChatMessage, GenerateParams, GenerateResult, Summary, Token

__all__ = [
    "NO_RETRIES",
    "AsyncClient",
    "AsyncTokenStream",
    "ChatMessage",
    "Client",
    "ClientOptions",
    "GenerateParams",
    "GenerateResult",
    "RetryPolicy",
    "Summary",
    "Token",
    "TokenStream",
]
