"""Tokenization and chat templates in worker processes, off the event loop and the
engine thread.

In the daemon's own process a 1 MB prompt held the GIL for 1.1 s (the Rust
encode) and a chat template is Jinja, pure Python: either froze every decoding
stream (measured: 1 to 2.7 s). Even with the GIL-releasing encode, a thread
left the gaps between the tokens of 6 decoding streams at p99 3.4x their median
(tests/test_server_stalls.py, 2 cores: 64 ms against 19); processes keep it
under 2x. So both run in `server.tokenizer_processes` worker processes
(forkserver: none inherits the daemon's threads), each loading the tokenizer
once from the checkpoint's files and running at a lower CPU priority than the
engine. Ids come back as packed int32 bytes: no half-million-element list to
unpickle next to the engine.

Without a tokenizer file on disk (scripted engines in tests) or with
`tokenizer_processes: 0`, the engine's tokenizer runs on one thread instead.
"""
import asyncio
import logging
import multiprocessing
import os
from array import array
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import grpc

from moed.errors import MoedError
from moed.model.tokenizer import has_tokenizer
from moed.server.status import RequestRejected, from_moed_error

log = logging.getLogger("moed.server")
WORKER_NICE = 5         # new prompts wait a little; running streams do not
_tokenizer = None       # a worker process's Tokenizer


def encode(tok, text, add_special_tokens):
    return array("i", tok.encode(text, add_special_tokens=add_special_tokens)).tobytes()


def tokenize_response(tok, text, add_special_tokens):
    """A serialized TokenizeResponse: building one from 500k ids costs 55 ms of GIL,
    parsing it back 8 ms (C)."""
    from moed.server.gen.generation_pb2 import TokenizeResponse
    ids = tok.encode(text, add_special_tokens=add_special_tokens)
    return TokenizeResponse(token_ids=ids).SerializeToString()


def encode_chat(tok, messages):
    text = tok.apply_chat_template(messages)
    # the template writes BOS and the role markers itself
    return array("i", tok.encode(text, add_special_tokens=False)).tobytes()


# -- in a worker process
def _load(model_dir):
    global _tokenizer
    os.nice(WORKER_NICE)
    from moed.model.tokenizer import Tokenizer
    _tokenizer = Tokenizer.from_dir(model_dir)


def _ready():
    return os.getpid()


def _in_worker(fn, *args):
    try:
        return fn(_tokenizer, *args)
    except MoedError as e:
        rejected = from_moed_error(e)
        if rejected is None:
            raise
        raise rejected from None


class TokenizerPool:
    def __init__(self, model_dir, processes, local_tokenizer):
        self.model_dir = Path(model_dir)
        self.processes = processes
        self._local = local_tokenizer       # () -> the engine's Tokenizer (thread fallback)
        self._executor = None
        self.kind = None                    # "processes" | "thread"

    def start(self):
        """Start the workers now (they load next to the model, not on the first request)."""
        if self.processes > 0 and has_tokenizer(self.model_dir):
            self.kind = "processes"
            self._executor = self._process_pool()
            for _ in range(self.processes):
                self._executor.submit(_ready)
        else:
            self.kind = "thread"
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="moed-tokenize")

    def _process_pool(self):
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])     # workers fork with it imported
        else:
            context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self.processes, mp_context=context, initializer=_load,
                                   initargs=(str(self.model_dir),))

    async def encode(self, text, add_special_tokens=True):
        """-> array('i') of token ids; raises RequestRejected."""
        return await self._run(encode, text, add_special_tokens)

    async def encode_chat(self, messages):
        """The conversation through the chat template, then encoded -> array('i')."""
        return await self._run(encode_chat, messages)

    async def tokenize(self, text, add_special_tokens):
        """-> TokenizeResponse"""
        from moed.server.gen.generation_pb2 import TokenizeResponse
        return TokenizeResponse.FromString(
            await self._run(tokenize_response, text, add_special_tokens, packed=False))

    async def _run(self, fn, *args, packed=True):
        loop = asyncio.get_running_loop()
        try:
            if self.kind == "processes":
                result = await loop.run_in_executor(self._executor, _in_worker, fn, *args)
            else:
                result = await loop.run_in_executor(self._executor, fn, self._local(), *args)
        except RequestRejected:
            raise
        except MoedError as e:
            rejected = from_moed_error(e)
            if rejected is None:
                raise _failed(e) from e
            raise rejected from None
        except BrokenProcessPool as e:
            log.error("a tokenizer worker process died; starting new ones")
            self._executor = self._process_pool()
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE,
                                  "a tokenizer worker died under this request; retry") from e
        except Exception as e:
            log.error("tokenizing failed: %r", e)
            raise _failed(e) from e
        if not packed:
            return result
        ids = array("i")
        ids.frombytes(result)
        return ids

    def shutdown(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


def _failed(error):
    return RequestRejected(grpc.StatusCode.INTERNAL,
                           f"tokenizing the request failed ({type(error).__name__})")
