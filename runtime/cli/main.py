"""The ``edgewise`` command: argv -> settings -> wiring, nothing else.

Every failure edgewise expects ends as one readable line on stderr and a non-zero exit code
(1 for an error, 2 for bad usage, 130 for an interrupt); no traceback. A reader that closes the
output early (``edgewise pipeline runs --json | head``) ends the command quietly, exit 141.
"""

from __future__ import annotations

import argparse
import math
import os
import select
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgewise.runtime.cli import store as store_cli
from edgewise.runtime.cli.batch import add_batch
from edgewise.runtime.cli.capture import add_capture
from edgewise.runtime.cli.drift_history import add_drift_history
from edgewise.runtime.cli.evaluation import add_evaluate, add_gate
from edgewise.runtime.cli.limits import add_limits
from edgewise.runtime.cli.logformat import LOG_FORMATS, configure_logging
from edgewise.runtime.cli.pipeline import add_pipeline
from edgewise.runtime.cli.rollout import ROLLOUT_ACTIONS, add_rollout_actions, run_rollout
from edgewise.runtime.config.settings import AUTO, switch
from edgewise.runtime.errors import EdgewiseError, InvalidInput
from edgewise.runtime.resources.cgroup_run import add_run
from edgewise.runtime.resources.render import add_containers

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left


def _add_convert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a scikit-learn model to an ONNX model package",
        description="Convert a pickled scikit-learn estimator or pipeline to ONNX, prove parity "
        "with the original on a sample, and write a model package REPO/NAME/VERSION/.",
    )
    p.add_argument("model", type=Path, help="the fitted model (.joblib or .pkl)")
    p.add_argument("--sample", type=Path, required=True, help="sample data (.csv, .parquet, .npy)")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--out", type=Path, required=True, help="model repository folder")
    p.add_argument("--held-out", type=Path, help="extra data for the parity check")
    p.add_argument(
        "--labels",
        type=Path,
        help="a classifier's true labels of the held-out rows (else of the sample), one column: "
        "calibrates its probabilities to estimate accuracy and ROC-AUC before labels arrive",
    )
    p.add_argument("--opset", type=int, help="target ONNX opset (default: edgewise's choice)")
    p.add_argument(
        "--atol",
        type=_tolerance,
        default=1e-4,
        help="absolute parity tolerance (default 1e-4): probabilities and labels must match "
        "within it",
    )
    p.add_argument(
        "--rtol",
        type=_tolerance,
        help="relative parity tolerance (default 1e-5), only for unbounded outputs (regression "
        "predictions, transforms): they must match within atol + rtol * |value|",
    )
    p.add_argument("--version", type=int, help="version number (default: the next free one)")
    p.add_argument(
        "--no-profile", action="store_true", help="do not store a reference profile for drift"
    )
    p.set_defaults(handler=_cmd_convert)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def _cmd_convert(args: argparse.Namespace) -> int:
    from edgewise.runtime.convert.converter import convert_files, require_converter

    require_converter()  # a node without the convert extra is told so first
    if not args.model.is_file():
        raise InvalidInput(f"{args.model}: no such file")
    for option, path in (("--sample", args.sample), ("--held-out", args.held_out),
                         ("--labels", args.labels)):  # fmt: skip
        if path is not None and not path.is_file():
            raise InvalidInput(f"{option} {path}: no such file")
    tolerances = {"atol": args.atol} | ({} if args.rtol is None else {"rtol": args.rtol})
    result = convert_files(
        args.model,
        args.sample,
        name=args.name,
        repo=args.out,
        held_out_path=args.held_out,
        labels_path=args.labels,
        opset=args.opset,
        version=args.version,
        **tolerances,
        reference_profile=not args.no_profile,
    )
    parity = result.manifest.parity.get("max_abs_diff", {})
    figures = ", ".join(f"{k} {v:.3g}" for k, v in parity.items())
    print(f"wrote {result.path} (parity max |diff|: {figures or 'n/a'})")
    return 0


def _processes(text: str) -> int | str:
    """``--processes``: a count of at least 1, or ``auto``."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a count of at least 1 or 'auto', not {text!r}")
    return count


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC (Open Inference Protocol V2)",
        description="Serve every model in REPO over gRPC: the Open Inference Protocol (V2), "
        "edgewise's repository service, grpc.health.v1 and server reflection; Prometheus "
        "metrics over HTTP. Flags override EDGEWISE_* environment variables.",
    )
    p.add_argument("--repo", type=Path, help="model repository folder [EDGEWISE_REPO]")
    p.add_argument("--host", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="gRPC port (default 8001; 0 picks a free one)")
    p.add_argument(
        "--metrics-host",
        help="metrics address to bind (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    p.add_argument("--metrics-port", type=int, help="metrics port (default 8002; -1 disables)")
    p.add_argument(
        "--http-port",
        type=int,
        help="serve the Open Inference Protocol's HTTP/REST API too, on this port of --host "
        "(0 picks a free one; default: off)",
    )
    p.add_argument("--max-message-bytes", type=int, help="largest gRPC message (default 64 MiB)")
    p.add_argument("--worker-threads", type=int, help="threads for large requests and control")
    p.add_argument("--inline-max-bytes", type=int, help="payloads up to this run on the loop")
    p.add_argument("--intra-op-threads", type=int, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--inter-op-threads", type=int, help="onnxruntime inter-op threads (default 1)")
    p.add_argument("--version-policy", help="latest:N | all | specific:V1,V2 (default latest:1)")
    p.add_argument("--grace-seconds", type=float, help="drain time on SIGTERM (default 10)")
    p.add_argument("--port-file", type=Path, help="write 'GRPC_PORT METRICS_PORT' when ready")
    p.add_argument(
        "--monitoring",
        type=switch,
        metavar="{on,off}",
        help="per-request statistics and drift (default on); off never loads numba: "
        "about 115 MB less resident memory and 0.35 s faster start",
    )
    p.add_argument(
        "--front-end",
        choices=["auto", "native", "grpcio"],
        help="what serves the gRPC port: native is gRPC's C++ server, answering ModelInfer "
        "with no Python gRPC work per call (built by `make native`); grpcio is "
        "Python's grpc.aio server; auto (default): native where it is built",
    )
    p.add_argument(
        "--native-fast-path",
        type=switch,
        metavar="{on,off}",
        help="with the native front end, answer the common ModelInfer call (a model without "
        "batching or feature lookups, numeric inputs, no tokens, capture, tracing or split) in "
        "C++ without the GIL (default on); anything else takes the Python path, counted in "
        "edgewise_native_fallback_total (docs/native.md)",
    )
    p.add_argument(
        "--processes",
        type=_processes,
        help="server processes sharing the port (default 1); 'auto': one per core of the CPU "
        "budget, as many as the memory budget holds (384 MiB each)",
    )
    p.add_argument(
        "--quality",
        type=switch,
        metavar="{on,off}",
        help="keep predictions by request id for delayed labels (default on)",
    )
    p.add_argument("--alert-command", help="run with each quality/drift alert as JSON on stdin")
    p.add_argument("--alert-webhook", help="POST each quality/drift alert as JSON here")
    p.add_argument(
        "--drift-interval-seconds", type=float, help="drift timer (default 10; 0: on demand only)"
    )
    _add_serve_security(p)
    _add_serve_capture(p)
    _add_serve_tracing(p)
    p.set_defaults(handler=_cmd_serve)


def _add_serve_tracing(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "tracing",
        "OpenTelemetry spans of each inference call, exported over OTLP/gRPC (needs pip install "
        "edgewise[otel]); see docs/observability.md",
    )
    g.add_argument(
        "--otel-endpoint", metavar="URL", help="OTLP/gRPC collector, e.g. http://localhost:4317"
    )
    g.add_argument(
        "--otel-sample-ratio",
        type=float,
        metavar="R",
        help="fraction of new traces sampled, 0 to 1 (default 1); a caller's traceparent decides "
        "for its own",
    )


#: Settings of ``serve``'s data capture flags (see _add_serve_capture).
SERVE_CAPTURE_KEYS = (
    "capture_dir", "capture_rate", "capture_max_bytes", "capture_queue", "capture_queue_bytes",
    "capture_flush_seconds",
)  # fmt: skip


def _add_serve_capture(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "data capture",
        "a sample of requests and answers written to rotating Parquet files, off the request "
        "path (needs pip install edgewise[data]); see `edgewise capture`",
    )
    g.add_argument("--capture-dir", type=Path, help="capture into this folder (default: off)")
    g.add_argument(
        "--capture-rate",
        type=float,
        help="fraction of requests captured, 0 to 1 (default 1); a model's config.json "
        '{"capture": {"rate": R}} overrides it; by a hash of the request id where there is one',
    )
    g.add_argument(
        "--capture-max-bytes",
        type=int,
        help="size cap of the folder: oldest files removed beyond it (default 1 GiB)",
    )
    g.add_argument(
        "--capture-queue",
        type=int,
        help="captured records waiting for the writer; beyond, records are dropped and counted "
        "(default 10000)",
    )
    g.add_argument(
        "--capture-queue-bytes",
        type=int,
        help="bytes of the captured records (inputs and answers) waiting for the writer; "
        "beyond, records are dropped and counted (default 64 MiB)",
    )
    g.add_argument(
        "--capture-flush-seconds",
        type=float,
        help="write a file at least this often (default 5; sooner once 5000 records wait); "
        "SIGKILL loses at most what waits for the writer (--capture-queue records)",
    )


#: Settings of ``serve``'s security and overload flags (see _add_serve_security).
SERVE_SECURITY_KEYS = (
    "tls_cert", "tls_key", "tls_client_ca", "tokens_file", "health_open", "reflection_open",
    "trusted_keys", "max_inflight", "retry_after_ms", "audit_log", "audit_log_max_bytes",
    "metrics_auth", "metrics_tls", "credential_limits",
)  # fmt: skip


def _add_serve_security(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security and overload")
    g.add_argument("--tls-cert", type=Path, help="PEM certificate chain: TLS on the gRPC port")
    g.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    g.add_argument(
        "--tls-client-ca", type=Path, help="PEM CA bundle: require client certificates (mTLS)"
    )
    g.add_argument(
        "--tokens-file",
        type=Path,
        help="bearer tokens, one per line: TOKEN [SCOPES [ID]], scopes infer,read,admin "
        "(none: all); under mTLS also client certificates: cert:CN=NAME SCOPES [ID] or "
        "cert:SAN=VALUE SCOPES [ID]; re-read when changed; also EDGEWISE_TOKENS (all scopes)",
    )
    g.add_argument(
        "--audit-log",
        type=Path,
        help="append a JSON line per control-plane call (load, unload, resets, feedback, "
        "rollout changes; refused ones too) to this file (default: off)",
    )
    g.add_argument(
        "--audit-log-max-bytes",
        type=int,
        help="rotate the audit log past this size: PATH.1 .. PATH.5 (default 10 MiB)",
    )
    g.add_argument(
        "--metrics-auth",
        type=switch,
        metavar="on|off",
        help="/metrics needs a bearer token with the read scope, as the gRPC port checks it "
        "(/healthz stays open; default off)",
    )
    g.add_argument(
        "--metrics-tls",
        type=switch,
        metavar="on|off",
        help="serve the metrics port over TLS with --tls-cert/--tls-key (and --tls-client-ca: "
        "mutual TLS), re-read when they change (default off)",
    )
    g.add_argument(
        "--health-open",
        action=argparse.BooleanOptionalAction,
        help="health service without a token (default: open)",
    )
    g.add_argument(
        "--reflection-open",
        action=argparse.BooleanOptionalAction,
        help="server reflection without a token (default: closed when tokens are on)",
    )
    g.add_argument(
        "--trusted-keys",
        type=Path,
        help="ed25519 public key file or folder: refuse packages not signed by one of them "
        "(keys.json beside them sets a key's not_after, revoked.json revokes keys or packages)",
    )
    g.add_argument(
        "--max-inflight", type=int, help="inference calls at once; beyond: RESOURCE_EXHAUSTED"
    )
    g.add_argument(
        "--retry-after-ms", type=int, help="retry hint sent with RESOURCE_EXHAUSTED (default 50)"
    )
    g.add_argument(
        "--credential-limits",
        metavar="LIMITS",
        help="every credential's limits of inference calls, e.g. 'rate=50/s burst=100 "
        "share=0.5' (calls/s, calls at once beyond the rate, share of --max-inflight); a "
        "tokens-file line's own rate=/burst=/share= override them; past them: "
        "RESOURCE_EXHAUSTED / HTTP 429 with the retry hint (default: none)",
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from edgewise.runtime.config.limits import prepare_process

    prepare_process()  # size numba's and BLAS's pools to the limits before they are imported
    from edgewise.runtime.app.server import run_server
    from edgewise.runtime.config.settings import ServerSettings

    keys = [
        "repo", "host", "port", "metrics_host", "metrics_port", "max_message_bytes",
        "worker_threads", "inline_max_bytes", "intra_op_threads", "inter_op_threads",
        "version_policy", "grace_seconds", "port_file", "monitoring", "drift_interval_seconds",
        "processes", "quality", "alert_command", "alert_webhook", "front_end", "http_port",
        "native_fast_path",
    ]  # fmt: skip
    keys.extend(SERVE_SECURITY_KEYS)
    keys.extend(SERVE_CAPTURE_KEYS)
    keys.extend(("otel_endpoint", "otel_sample_ratio"))
    settings = ServerSettings.from_sources({k: getattr(args, k) for k in keys})
    if not settings.repo.is_dir():
        raise EdgewiseError(f"model repository {settings.repo} is not a folder")
    if settings.otel_endpoint is not None:
        from importlib.util import find_spec

        for module in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc"):
            try:
                found = find_spec(module) is not None
            except ModuleNotFoundError:  # a parent package is missing
                found = False
            if not found:
                raise EdgewiseError(
                    f"--otel-endpoint needs the otel extra ({module} is not installed): "
                    "pip install 'edgewise[otel]'"
                )
    return run_server(settings)


def _add_repository(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "repository",
        help="list, load and unload models, split, shadow and label versions on a running server",
        description="Control a running server's model repository.",
    )
    p.add_argument("--server", default="127.0.0.1:8001", help="HOST:PORT (default 127.0.0.1:8001)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    index = actions.add_parser("index", help="every model version and its state")
    index.add_argument("--ready", action="store_true", help="only versions ready to serve")
    load = actions.add_parser("load", help="load a model (its policy's versions, or one)")
    load.add_argument("name")
    load.add_argument("--version", default="", help="one version to load")
    load.add_argument(
        "--make-default",
        action="store_true",
        help="serve it when none is named, now and after a restart (written to the model's "
        "config.json as default_version)",
    )
    unload = actions.add_parser("unload", help="unload a model, or one version")
    unload.add_argument("name")
    unload.add_argument("--version", default="")
    add_rollout_actions(actions)
    _client_security(p)
    p.set_defaults(handler=_cmd_repository)


def _client_security(p: argparse.ArgumentParser) -> None:
    from edgewise.runtime.config.settings import add_client_security_arguments

    add_client_security_arguments(p)


def _cmd_repository(args: argparse.Namespace) -> int:
    from edgewise.runtime.client.client import EdgewiseClient
    from edgewise.runtime.config.settings import client_security_from_args as security_from_args

    with EdgewiseClient(args.server, security=security_from_args(args)) as client:
        if args.action in ROLLOUT_ACTIONS:
            return run_rollout(args, client)
        if args.action == "index":
            states = client.repository_index(ready_only=args.ready)
        elif args.action == "load":
            states = client.load_model(args.name, args.version, args.make_default)
        else:
            states = client.unload_model(args.name, args.version)
    print(f"{'MODEL':<20} {'VERSION':>7}  {'STATE':<11} {'DEFAULT':<7} SHA256 / REASON")
    for s in states:
        detail = s.reason or s.sha256[:16]
        print(
            f"{s.name:<20} {s.version:>7}  {s.state:<11} {'yes' if s.is_default else '':<7} "
            f"{detail}"
        )
    return 0


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="train, convert and serve a model, then answer a few requests",
        description="Train a logistic regression on scikit-learn's breast cancer data, convert "
        "it, place it in a local model repository, serve it, send a few requests with a client "
        "and print the answers; then keep serving until interrupted.",
    )
    p.add_argument("--repo", type=Path, default=Path("demo-repo"), help="repository folder")
    p.add_argument("--port", type=int, default=8001, help="gRPC port (0 picks a free one)")
    p.add_argument("--metrics-port", type=int, default=8002, help="metrics port (0: free one)")
    p.add_argument(
        "--exit-after-requests", action="store_true", help="stop after the sample requests"
    )
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgewise.runtime.cli.demo import run_demo

    return run_demo(args.repo, args.port, args.metrics_port, args.exit_after_requests)


def _add_drift(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "drift",
        help="drift report of a served model version",
        description="Print the feature statistics, schema skew and drift scores of a served "
        "model version against its reference profile.",
    )
    p.add_argument("model", help="model name")
    p.add_argument("--server", default="127.0.0.1:8001", help="HOST:PORT (default 127.0.0.1:8001)")
    p.add_argument("--version", default="", help="model version (default: the default version)")
    p.add_argument(
        "--window",
        default="current",
        choices=["current", "previous", "decayed", "lifetime"],
        help="which window (default current)",
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="also run exact KS/Wasserstein tests on the window's most recent rows "
        "(current and previous windows only)",
    )
    p.add_argument(
        "--reset",
        action="store_true",
        help="start over after printing (drops the current and previous windows and their "
        "rows; reading a report never does)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _client_security(p)
    p.set_defaults(handler=_cmd_drift)


def _cmd_drift(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToJson

    from edgewise.runtime.client.client import EdgewiseClient
    from edgewise.runtime.config.settings import client_security_from_args as security_from_args

    with EdgewiseClient(args.server, security=security_from_args(args)) as client:
        report = client.drift_report(args.model, args.version, args.window, args.exact)
        if args.reset:
            client.reset_window(args.model, args.version)
    if args.json:
        print(MessageToJson(report, always_print_fields_with_no_presence=True))
        return 0
    print(_format_drift(report))
    return 0


def _format_drift(report: Any) -> str:
    head = f"model {report.model} version {report.version}, window {report.window}"
    if not report.available:
        return f"{head}: monitoring unavailable ({report.reason})"
    state = "DRIFTING" if report.drifting else "not drifting"
    if report.insufficient_data:
        state = "not judged: too few rows"
    lines = [
        f"{head}: {report.rows} rows (reference {report.reference_rows}); {state}",
        *([report.reason] if report.reason else []),  # e.g. which look the verdict is
        f"{'feature':<28} {'kind':<11} {'psi':>7} {'js':>6} {'ks':>6} {'wass':>8} "
        f"{'mean':>10} {'missing':>7} {'out/unseen':>10}  status",
    ]

    def score(feature: Any, key: str, width: int, digits: int = 3) -> str:
        value = feature.scores.get(key)
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    for f in report.features:
        stats = f.statistics
        status = "DRIFT " + "; ".join(f.reasons) if f.drifting else ("warn" if f.warning else "ok")
        if f.kind == "multivariate":  # its own line below: it has none of the columns
            scores = f.scores
            if "reconstruction_error" in scores:
                change = 100 * scores["reconstruction_error_change"]
                test = (
                    f"{scores['reconstruction_error']:.4g} against the reference's "
                    f"{scores['reconstruction_error_reference']:.4g} ({change:+.1f} %), "
                    f"one-sided p {scores['reconstruction_error_pvalue']:.3g}; {status}"
                )
            else:
                test = "not scored (too few rows)"
            lines.append(f"multivariate: mean PCA reconstruction error {test}")
            continue
        binned = f.kind in ("numeric", "prediction")
        skew = stats.out_of_range if binned else stats.unseen
        mean = f"{stats.mean:>10.4g}" if binned else f"{'':>10}"
        lines.append(
            f"{f.name[:28]:<28} {f.kind:<11} {score(f, 'psi', 7)} {score(f, 'jensenshannon', 6)} "
            f"{score(f, 'ks', 6)} {score(f, 'wasserstein', 8, 4)} {mean} {stats.missing:>7} "
            f"{skew:>10}  {status}"
        )
    for detector in sorted(report.unavailable):
        lines.append(report.unavailable[detector])
    if report.wrong_type:
        wrong = ", ".join(f"{k}: {v}" for k, v in sorted(report.wrong_type.items()))
        lines.append(f"requests refused for a wrong datatype or shape: {wrong}")
    if report.windows_dropped:
        lines.append(
            f"closed windows the drift history could not keep (queue full): "
            f"{report.windows_dropped}"
        )
    return "\n".join(lines)


def _add_quality(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "quality",
        help="online quality of a served model version (from delayed labels)",
        description="Print the running error, per-slice errors and the change detectors' state "
        "of a served model version, from the labels sent with `edgewise feedback`. Reading "
        "changes nothing: 'DRIFT detected' stays until --reset acknowledges it.",
    )
    p.add_argument("model")
    p.add_argument("--server", default="127.0.0.1:8001", help="HOST:PORT (default 127.0.0.1:8001)")
    p.add_argument("--version", default="", help="model version (default: the default version)")
    p.add_argument(
        "--reset",
        action="store_true",
        help="after printing, acknowledge the detections (ResetQuality): 'drifting' starts over; "
        "the totals and the detectors' state are kept",
    )
    _client_security(p)
    p.set_defaults(handler=_cmd_quality)
    f = sub.add_parser(
        "feedback",
        help="send ground-truth labels for earlier requests",
        description="Send labels for earlier requests: a CSV or Parquet table with the columns "
        "request_id, label and optionally row (default 0). Request ids are read as text. Every "
        "cell is checked before anything is sent, and the server refuses the whole batch if one "
        "label is bad (not a class of the model, NaN, the wrong type): nothing is joined then.",
    )
    f.add_argument("model")
    f.add_argument("--labels", type=Path, required=True, help="table of request_id,label[,row]")
    f.add_argument("--server", default="127.0.0.1:8001", help="HOST:PORT (default 127.0.0.1:8001)")
    f.add_argument(
        "--version",
        default="",
        help="model version (default: each label goes to the version that answered its request)",
    )
    f.add_argument(
        "--label-type",
        default="auto",
        choices=["auto", "int", "float", "str"],
        help="how CSV labels are read: auto (default) takes a whole number as a class index, "
        "another number as a value and anything else as a class name",
    )
    _client_security(f)
    f.set_defaults(handler=_cmd_feedback)


def _cmd_quality(args: argparse.Namespace) -> int:
    from edgewise.runtime.client.client import EdgewiseClient
    from edgewise.runtime.config.settings import client_security_from_args as security_from_args

    with EdgewiseClient(args.server, security=security_from_args(args)) as client:
        report = client.quality_report(args.model, args.version)
        if args.reset and report.available:
            client.reset_quality(args.model, args.version)
    head = f"model {report.model} version {report.version}"
    if not report.available:
        print(f"{head}: quality unavailable ({report.reason})")
        return 0
    state = "DRIFT detected" if report.drifting else ("warning" if report.warning else "stable")
    print(
        f"{head}: {report.labelled} labelled predictions ({report.kept_predictions} kept); "
        f"{report.metric} {report.error:.4g} overall, {report.recent_error:.4g} over the last "
        f"{report.window}; {state}; {report.drifts} detection(s) since load"
    )
    for item in report.slices:
        print(f"  {item.slice:<40} {item.count:>8}  {report.metric} {item.error:.4g}")
    if not report.checked:
        print(f"CBPE against the labels: not checked ({report.check_reason})")
    elif report.checked_rows:
        print(
            f"CBPE against the labels, on the {report.checked_rows} labelled rows: estimated "
            f"accuracy {report.estimated_accuracy:.4f}, realized {report.realized_accuracy:.4f} "
            f"(difference {report.realized_accuracy - report.estimated_accuracy:+.4f}; chance "
            f"alone gives +-{report.accuracy_chance:.4f})"
        )
    else:
        print("CBPE against the labels: no labelled row with a confidence yet")
    if args.reset:
        print("detections acknowledged: drifting starts over")
    return 0


def _cmd_feedback(args: argparse.Namespace) -> int:
    from edgewise.runtime.cli.labels import read_labels
    from edgewise.runtime.client.client import EdgewiseClient
    from edgewise.runtime.config.settings import client_security_from_args as security_from_args

    labels = read_labels(args.labels, args.label_type)
    with EdgewiseClient(args.server, security=security_from_args(args)) as client:
        result = client.submit_feedback(args.model, labels, args.version)
    print(f"joined {result.joined}, unknown {result.unknown}, duplicate {result.duplicate}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgewise",
        description="A lightweight runtime for serving classical ML models over gRPC.",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument(
        "--log-format",
        choices=list(LOG_FORMATS),
        help="text (default; EDGEWISE_LOG_FORMAT) or json: one object per line with time, level, "
        "event, logger and, where known, model, version, request_id, trace_id",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_serve(sub)
    _add_repository(sub)
    _add_demo(sub)
    _add_drift(sub)
    add_drift_history(sub)
    _add_quality(sub)
    add_limits(sub)
    add_run(sub)
    add_containers(sub)
    store_cli.add_register(sub)
    store_cli.add_models(sub)
    store_cli.add_agent(sub)
    store_cli.add_rollback(sub)
    store_cli.add_keys(sub)
    add_evaluate(sub)
    add_gate(sub)
    add_batch(sub)
    add_capture(sub)
    add_pipeline(sub)
    return parser


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader closed it (``edgewise ... | head``)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_format)
    except EdgewiseError as exc:
        print(f"edgewise: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    handler: Any = args.handler
    try:
        code = int(handler(args))
        sys.stdout.flush()  # a reader that went away is seen here, not at exit
        return code
    except BrokenPipeError as exc:
        if not _stdout_gone():  # another pipe (a socket, a child): an error like any OSError
            print(f"edgewise {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return EXIT_BROKEN_PIPE
    except EdgewiseError as exc:
        print(f"edgewise {args.command}: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(f"edgewise {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
