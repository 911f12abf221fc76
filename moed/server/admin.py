"""AdminService: operator views and controls. The token check is auth.py's."""
import time

import grpc

from moed.server import protocol
from moed.server.gen import admin_pb2 as pb
from moed.server.gen import admin_pb2_grpc

STATES = {"waiting": pb.REQUEST_STATE_WAITING, "prefill": pb.REQUEST_STATE_PREFILL,
          "decode": pb.REQUEST_STATE_DECODE}


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, app):
        self.app = app

    async def GetServerStatus(self, request, context):
        app, loop = self.app, self.app.engine_loop
        stats = loop.snapshot.stats
        resp = pb.GetServerStatusResponse(
            uptime_seconds=time.monotonic() - app.started, num_running=stats["num_running"],
            num_waiting=stats["num_waiting"], kv_blocks_used=stats["kv_blocks_used"],
            kv_blocks_total=stats["kv_blocks_total"], tokens_per_second=loop.rate.per_second(),
            draining=app.draining, ready=app.ready, requests_served=loop.requests_served,
            prefix_cache_queries=stats.get("prefix_cache_queries", 0),
            prefix_cache_hits=stats.get("prefix_cache_hits", 0),
            kv_blocks_cached=stats.get("kv_blocks_cached", 0))
        if app.ready:
            info = loop.engine.model_info
            resp.model.CopyFrom(protocol.model_info_response(info, app.model_dir))
            resp.isa, resp.device = info["isa"], info["device"]
            resp.backends, resp.planner = info["backends"], info["planner"]
        return resp

    async def ListRequests(self, request, context):
        now = time.time_ns()
        return pb.ListRequestsResponse(requests=[
            pb.RequestSummary(request_id=rid, state=STATES[state], prompt_tokens=n_in,
                              completion_tokens=n_out, age_seconds=(now - t0) / 1e9)
            for rid, state, n_in, n_out, t0 in self.app.engine_loop.snapshot.requests])

    async def CancelRequest(self, request, context):
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: is empty")
        limit = self.app.cfg.max_request_id_chars
        if len(request.request_id) > limit:        # it is echoed below
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request_id: longer than {limit} characters")
        await self.app.require_loaded(context)
        if not await self.app.engine_loop.cancel(request.request_id):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"request_id: no request {request.request_id!r} is in flight")
        return pb.CancelRequestResponse()

    async def Drain(self, request, context):
        await self.app.drain()
        return pb.DrainResponse(in_flight=self.app.active_streams)

    async def Resume(self, request, context):
        await self.app.resume()
        return pb.ResumeResponse()
