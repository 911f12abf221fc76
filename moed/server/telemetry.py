"""OpenTelemetry: one span per request with queue / prefill / decode children,
and the GenAI semantic-convention server metrics, with the engine's own gauges
(running / waiting requests, KV blocks, prefix cache) and per-prefill-path figures.
Prometheus reads them all at the HTTP API's /metrics through OpenTelemetry's
Prometheus exporter, on a registry of this server's own.

Spans are written when the request finishes, with the timestamps the engine
thread recorded, so the hot loop never holds a live span. Providers are this
server's own (not the global ones) so two servers in one process — as in
tests — never mix their data. OTLP export only when
OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise nothing leaves the process.
"""
import os

from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

OPERATION = "text_completion"      # a chat prompt's request: "chat" (Tracked.operation)
PROVIDER = "moed"
# Seconds; the bucket edges the GenAI conventions recommend for each metric.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


def otlp_exporters():
    """(span exporter, metric reader) for OTLP, or (None, None) when no endpoint is set."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None, None
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    return OTLPSpanExporter(), PeriodicExportingMetricReader(OTLPMetricExporter())


class Telemetry:
    def __init__(self, service_name="moed", model_name="", span_exporter=None,
                 metric_reader=None, server_address=None, batch=True):
        if span_exporter is None and metric_reader is None:
            span_exporter, metric_reader = otlp_exporters()
        resource = Resource.create({"service.name": service_name})
        self.tracer_provider = TracerProvider(resource=resource)
        if span_exporter is not None:
            processor = BatchSpanProcessor if batch else SimpleSpanProcessor
            self.tracer_provider.add_span_processor(processor(span_exporter))
        self.prometheus = CollectorRegistry(auto_describe=True)
        readers = [PrometheusMetricReader(registry=self.prometheus)]
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers + (
            [metric_reader] if metric_reader else []))
        self.tracer = self.tracer_provider.get_tracer("moed.server")
        self.model_name = model_name
        self.server_address = server_address     # (host, port) once bound
        self.engine_stats = lambda: {}           # () -> the engine's latest stats (a dict)
        meter = self.meter_provider.get_meter("moed.server")
        self._make_instruments(meter)
        self._make_engine_gauges(meter)

    def prometheus_text(self):
        """Every metric in Prometheus' text format (what /metrics serves)."""
        return generate_latest(self.prometheus)

    def _make_instruments(self, meter):
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time from the request's arrival to its first output token",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS)
        self.tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Decode time per output token after the first",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS)
        self.duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="Time from the request's arrival to its last token",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        # The conventions define token usage under this one name, for clients and
        # servers alike; dashboards key on it.
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Input and output tokens per request",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)

        self.prompt_tokens = meter.create_counter(
            "moed.prompt_tokens", unit="{token}", description="Prompt tokens of finished requests")
        self.cached_tokens = meter.create_counter(
            "moed.prompt_tokens.cached", unit="{token}",
            description="Prompt tokens found in the prefix cache (not computed again)")
        self.generation_tokens = meter.create_counter(
            "moed.generation_tokens", unit="{token}", description="Tokens generated")
        self.prefill_duration = meter.create_histogram(
            "moed.prefill.duration", unit="s",
            description="Prefill time (first scheduled to first token) by prefill path",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.prefill_tokens = meter.create_counter(
            "moed.prefill.tokens", unit="{token}", description="Prompt tokens prefilled, by path")

    def _make_engine_gauges(self, meter):
        """The engine thread's latest snapshot, read when a scrape or export asks."""
        gauges = (("moed.requests.running", "num_running", "{request}", "Requests running"),
                  ("moed.requests.waiting", "num_waiting", "{request}", "Requests waiting"),
                  ("moed.kv_cache.blocks_used", "kv_blocks_used", "{block}", "KV blocks in use"),
                  ("moed.kv_cache.blocks_total", "kv_blocks_total", "{block}", "KV blocks in all"),
                  ("moed.kv_cache.blocks_cached", "kv_blocks_cached", "{block}",
                   "Unused KV blocks kept for their prefix"))
        for name, key, unit, description in gauges:
            meter.create_observable_gauge(name, [self._observe(key)], unit=unit,
                                          description=description)
        for name, key, description in (
                ("moed.prefix_cache.queries", "prefix_cache_queries", "Prompt tokens looked up"),
                ("moed.prefix_cache.hits", "prefix_cache_hits", "Prompt tokens found")):
            meter.create_observable_counter(name, [self._observe(key)], unit="{token}",
                                            description=description)

    def _observe(self, key):
        def callback(options):
            value = self.engine_stats().get(key)
            return [] if value is None else [Observation(value)]
        return callback

    def base_attributes(self, operation=OPERATION):
        attrs = {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER,
                 "gen_ai.request.model": self.model_name}
        if self.server_address:
            attrs["server.address"], attrs["server.port"] = self.server_address
        return attrs

    def record(self, t):
        """A finished Tracked request -> its spans and metric points."""
        attrs = self.base_attributes(t.operation)
        self._record_spans(t, attrs)
        self._record_metrics(t, attrs)

    def _record_metrics(self, t, attrs):
        if t.finish_reason == "cancelled":
            attrs = dict(attrs, **{"error.type": "cancelled"})
        self.duration.record((t.t_finished - t.t_arrival) / 1e9, attrs)
        if t.t_first_token is not None:
            self.ttft.record((t.t_first_token - t.t_arrival) / 1e9, attrs)
            if t.num_output_tokens > 1:
                decode_s = (t.t_finished - t.t_first_token) / 1e9
                self.tpot.record(decode_s / (t.num_output_tokens - 1), attrs)
        self.tokens.record(t.num_prompt_tokens, dict(attrs, **{"gen_ai.token.type": "input"}))
        self.tokens.record(t.num_output_tokens, dict(attrs, **{"gen_ai.token.type": "output"}))
        self.prompt_tokens.add(t.num_prompt_tokens, attrs)
        self.cached_tokens.add(t.num_cached_tokens, attrs)
        self.generation_tokens.add(t.num_output_tokens, attrs)
        if t.t_scheduled is not None and t.t_first_token is not None:
            path = dict(attrs, **{"moed.prefill.path": t.prefill_path,
                                  "moed.prefill.where": t.prefill_where})
            self.prefill_duration.record((t.t_first_token - t.t_scheduled) / 1e9, path)
            self.prefill_tokens.add(t.num_prompt_tokens - t.num_cached_tokens, path)

    def _record_spans(self, t, attrs):
        root = self.tracer.start_span(f"{t.operation} {self.model_name}".strip(),
                                      context=t.trace_context, kind=trace.SpanKind.SERVER,
                                      start_time=t.t_arrival,
                                      attributes={**attrs, **request_attributes(t)})
        ctx = trace.set_span_in_context(root)
        start_prefill = t.t_scheduled or t.t_finished
        end_prefill = t.t_first_token or t.t_finished
        self._child("queue", ctx, t.t_arrival, start_prefill, {})
        if t.t_scheduled is not None:
            self._child("prefill", ctx, start_prefill, end_prefill,
                        {"moed.prefill.chunks": t.prefill_chunks,
                         "moed.prefill.tokens": t.num_prompt_tokens,
                         "moed.prefill.cached_tokens": t.num_cached_tokens,
                         "moed.prefill.path": t.prefill_path,
                         "moed.prefill.plan": t.prefill_plan or "fixed budget",
                         "moed.prefill.where": t.prefill_where})
        if t.t_first_token is not None:
            self._child("decode", ctx, t.t_first_token, t.t_finished,
                        {"moed.decode.tokens": t.num_output_tokens})
        if t.finish_reason == "cancelled":
            root.set_attribute("error.type", "cancelled")
        root.end(end_time=t.t_finished)

    def _child(self, name, ctx, start, end, attrs):
        self.tracer.start_span(name, context=ctx, start_time=start, attributes=attrs) \
            .end(end_time=end)

    def shutdown(self):
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def request_attributes(t):
    p = t.params
    attrs = {"gen_ai.response.id": t.request_id,
             "gen_ai.response.finish_reasons": [t.finish_reason or "unknown"],
             "gen_ai.usage.input_tokens": t.num_prompt_tokens,
             "gen_ai.usage.output_tokens": t.num_output_tokens,
             "gen_ai.request.max_tokens": p.max_new_tokens,
             "gen_ai.request.temperature": float(p.temperature),
             "gen_ai.request.top_p": float(p.top_p),
             "gen_ai.request.frequency_penalty": float(p.frequency_penalty),
             "gen_ai.request.presence_penalty": float(p.presence_penalty)}
    if p.top_k:
        attrs["gen_ai.request.top_k"] = float(p.top_k)
    if p.seed is not None:      # OTLP ints are int64; a uint64 seed above that goes as text
        attrs["gen_ai.request.seed"] = int(p.seed) if p.seed < 1 << 63 else str(p.seed)
    if p.stop:
        attrs["gen_ai.request.stop_sequences"] = list(p.stop)
    return attrs
