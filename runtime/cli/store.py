"""The store and agent subcommands of ``edgewise``: ``register``, ``models``, ``agent`` and
``rollback``. Each ``add_*`` function adds one subcommand to the main parser (see
:mod:`edgewise.runtime.cli.main`); heavy modules are imported when a command runs, not at start-up.

``--store`` defaults to ``$EDGEWISE_STORE``, else the embedded store ``~/.edgewise/store.db``.
MLflow credentials come from the URI (``http://user:password@host``) or, better, from
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgewise.runtime.cli.argtypes import positive_seconds
from edgewise.runtime.config.settings import (
    add_client_security_arguments,
    client_security_from_args,
)
from edgewise.runtime.errors import InvalidInput

if TYPE_CHECKING:
    from edgewise.runtime.store.base import Store, VersionRecord

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_agent", "add_keys", "add_models", "add_register", "add_rollback"]


def _store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        help="store URI: sqlite:///PATH (default ~/.edgewise/store.db), mlflow://HOST:PORT or "
        "http(s)://HOST:PORT [EDGEWISE_STORE]",
    )
    parser.add_argument(
        "--store-timeout",
        type=positive_seconds,
        default=30.0,
        help="seconds per store request (default 30)",
    )


def _open_store(args: argparse.Namespace, create: bool = False) -> Store:
    """The store of ``--store``; only ``register`` creates a missing one (``create``)."""
    from edgewise.runtime.store import open_store, parse_store_uri

    uri = parse_store_uri(args.store or os.environ.get("EDGEWISE_STORE"))
    uri = uri.with_credentials(
        os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    )
    return open_store(uri, timeout=args.store_timeout, create=create)


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"


# ---- register --------------------------------------------------------------------------------


def add_register(sub: Subparsers) -> None:
    p = sub.add_parser(
        "register",
        help="publish a model package to a store, with its lineage",
        description="Publish the package folder REPO/NAME/VERSION to a metadata store as a new "
        "version of NAME, with lineage: the training code's git commit, parameters, metrics, a "
        "fingerprint of the training data, the sha256 and size of every file, time and author. "
        "A package without golden requests gets them (recorded from synthetic rows).",
    )
    p.add_argument("package", type=Path, help="the package folder REPO/NAME/VERSION")
    _store_argument(p)
    p.add_argument("--alias", help="point this alias (e.g. production) at the new version")
    p.add_argument("--description", default="", help="a line describing the version")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--params-file", type=Path, help="training parameters as a JSON object")
    p.add_argument("--metric", action="append", default=[], metavar="KEY=NUMBER")
    p.add_argument("--metrics-file", type=Path, help="metrics as a JSON object of numbers")
    p.add_argument(
        "--data", action="append", default=[], type=Path, help="training data file or folder"
    )
    p.add_argument("--code-dir", type=Path, help="training code's git work tree (default: cwd)")
    p.add_argument("--code-version", help="code version to record instead of git's commit")
    p.add_argument("--author", help="default: git user.name, else the login name")
    p.add_argument(
        "--allow-schema-change",
        action="store_true",
        help="let agents deploy it even if its input schema differs from the deployed one",
    )
    p.add_argument("--no-golden", action="store_true", help="do not add golden requests")
    p.add_argument(
        "--gate",
        type=Path,
        metavar="SPEC",
        help="run this promotion gate first; a failing candidate is registered but the alias "
        "stays where it is (exit 1)",
    )
    p.add_argument(
        "--sign-key",
        type=Path,
        metavar="KEY",
        help="ed25519 private key (edgewise keys generate): sign the published manifest",
    )
    p.add_argument("--json", action="store_true", help="print the version record as JSON")
    p.set_defaults(handler=_cmd_register)


def _check_register(args: argparse.Namespace, metrics: dict[str, Any]) -> None:
    """Every input ``register`` would refuse, checked before the store is opened (created)."""
    from edgewise.runtime.evaluation.gate import GateSpec
    from edgewise.runtime.package.manifest import read_manifest
    from edgewise.runtime.package.signing import load_private_key
    from edgewise.runtime.store.base import validate_alias
    from edgewise.runtime.store.lineage import check_lineage_inputs
    from edgewise.runtime.store.register import parse_package_path

    parse_package_path(args.package)
    read_manifest(args.package)
    if args.alias is not None:
        validate_alias(args.alias)
    check_lineage_inputs(code_dir=args.code_dir, metrics=metrics, data=args.data)
    if args.gate is not None:
        GateSpec.load(args.gate)
    if args.sign_key is not None:
        load_private_key(args.sign_key)


def _cmd_register(args: argparse.Namespace) -> int:
    from edgewise.runtime.store.lineage import parse_key_values, read_json_mapping
    from edgewise.runtime.store.register import register

    params: dict[str, Any] = {}
    if args.params_file:
        params.update(read_json_mapping(args.params_file, "params"))
    params.update(parse_key_values(args.param, "param"))
    metrics: dict[str, Any] = {}
    if args.metrics_file:
        metrics.update(read_json_mapping(args.metrics_file, "metrics"))
    metrics.update(parse_key_values(args.metric, "metric"))
    _check_register(args, metrics)  # a refused call creates no store
    store = _open_store(args, create=True)
    try:
        result = register(
            store,
            args.package,
            alias=args.alias,
            description=args.description,
            params=params,
            metrics=metrics,
            data=args.data,
            code_dir=args.code_dir,
            code_version=args.code_version,
            author=args.author,
            allow_schema_change=args.allow_schema_change,
            golden=not args.no_golden,
            gate=args.gate,
            sign_key=args.sign_key,
        )
    finally:
        store.close()
    record = result.record
    if result.gate is not None:
        print(result.gate.format())
        if not result.gate.passed:
            print(
                f"registered {record.name} version {record.version} in {store.uri}, but the gate "
                f"failed: alias {args.alias or '(none)'} not moved"
            )
            return 1
    if args.json:
        print(json.dumps(record.to_json(), indent=2))
        return 0
    alias = f"; alias {result.alias} -> {record.version}" if result.alias else ""
    golden = "; golden requests recorded" if result.golden_added else ""
    print(
        f"registered {record.name} version {record.version} in {store.uri} (model sha256 "
        f"{record.model_sha256[:16]}…, {len(record.files)} files, "
        f"{_human_bytes(record.total_bytes)}; code {record.lineage.code_version[:12]}){alias}"
        f"{golden}"
    )
    return 0


# ---- models ------------------------------------------------------------------------------------


def add_models(sub: Subparsers) -> None:
    p = sub.add_parser(
        "models",
        help="list, show and alias model versions in a store",
        description="Read a metadata store: registered models, versions with their lineage, "
        "aliases, and what each node reported; set or delete an alias.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="registered models, latest versions, aliases")
    _store_argument(listing)
    show = actions.add_parser("show", help="a model's versions, or one version's lineage")
    show.add_argument("name")
    which = show.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="one version")
    which.add_argument("--alias", help="the version an alias names")
    show.add_argument("--json", action="store_true", help="print JSON")
    _store_argument(show)
    alias = actions.add_parser("alias", help="point an alias at a version (or delete it)")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", type=int, nargs="?")
    alias.add_argument("--delete", action="store_true", help="delete the alias")
    _store_argument(alias)
    policy = actions.add_parser(
        "policy",
        help="show, set or clear the rollout policy of an alias (docs/rollout.md)",
        description="The steps a new version of an alias goes through on each node (shadow, "
        "canary shares) and the analysis that judges them. Without --file or --clear: show it.",
    )
    policy.add_argument("name")
    policy.add_argument("alias")
    policy_source = policy.add_mutually_exclusive_group()
    policy_source.add_argument("--file", type=Path, help="a JSON policy to store")
    policy_source.add_argument("--clear", action="store_true", help="no policy: switch at once")
    _store_argument(policy)
    p.set_defaults(handler=_cmd_models)


def _print_record(record: VersionRecord) -> None:
    lineage = record.lineage
    dirty = {True: " (uncommitted changes)", False: "", None: ""}[lineage.code_dirty]
    lines = [
        f"{record.name} version {record.version}"
        + (f"  [aliases: {', '.join(record.aliases)}]" if record.aliases else ""),
        f"  model sha256    {record.model_sha256}",
        f"  registered      {lineage.created_at} by {lineage.author or 'unknown'}",
        f"  converted       {lineage.package_created_at or 'unknown'}",
        f"  code            {lineage.code_version}{dirty}"
        + (f" ({lineage.code_origin})" if lineage.code_origin else ""),
        f"  data            {lineage.data_fingerprint or 'unknown'}"
        + (f" ({', '.join(lineage.data_sources)})" if lineage.data_sources else ""),
    ]
    if record.description:
        lines.append(f"  description     {record.description}")
    for key, value in sorted(lineage.params.items()):
        lines.append(f"  param           {key} = {value}")
    for key, number in sorted(lineage.metrics.items()):
        lines.append(f"  metric          {key} = {number:g}")
    lines.append(f"  files           ({_human_bytes(record.total_bytes)} in all)")
    for entry in record.files:
        lines.append(f"    {entry.path:<24} {entry.size:>12}  {entry.sha256}")
    print("\n".join(lines))


def _cmd_models(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        if args.action == "list":
            models = store.list_models()
            print(f"{'MODEL':<24} {'LATEST':>6}  ALIASES")
            for summary in models:
                aliases = ", ".join(f"{a}->{v}" for a, v in sorted(summary.aliases.items()))
                latest = "-" if summary.latest_version is None else str(summary.latest_version)
                print(f"{summary.name:<24} {latest:>6}  {aliases}")
        elif args.action == "show":
            _show(store, args)
        elif args.action == "policy":
            _policy(store, args)
        elif args.delete:
            if args.version is not None:
                raise InvalidInput("models alias --delete takes no VERSION")
            store.delete_alias(args.name, args.alias)
            print(f"deleted alias {args.alias} of {args.name}")
        else:
            if args.version is None:
                raise InvalidInput("models alias: give a VERSION (or --delete)")
            store.set_alias(args.name, args.alias, args.version)
            print(f"alias {args.alias} of {args.name} -> version {args.version}")
    finally:
        store.close()
    return 0


def _policy(store: Store, args: argparse.Namespace) -> None:
    from edgewise.runtime.agent.policy import policy_text, read_policy, write_policy

    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInput(f"--file {args.file}: {exc.strerror or exc}") from None
        policy = policy_text(text)  # refused here, before the store changes
        store.resolve_alias(args.name, args.alias)
        write_policy(store, args.name, args.alias, policy)
        print(f"rollout policy of {args.name} alias {args.alias}: {len(policy.steps)} step(s)")
    elif args.clear:
        write_policy(store, args.name, args.alias, None)
        print(f"rollout policy of {args.name} alias {args.alias}: none")
    else:
        current = read_policy(store, args.name, args.alias)
        print(json.dumps(None if current is None else current.to_json(), indent=2))


def _rollout_lines(store: Store, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from edgewise.runtime.agent.policy import POLICY_PREFIX
    from edgewise.runtime.agent.progressive import read_decisions

    policies = {
        key[len(POLICY_PREFIX) :]: json.loads(text)
        for key, text in store.model_tags(name, POLICY_PREFIX).items()
    }
    return policies, read_decisions(store, name)


def _show(store: Store, args: argparse.Namespace) -> None:
    if args.version is not None or args.alias:
        record = (
            store.get_version(args.name, args.version)
            if args.version is not None
            else store.resolve_alias(args.name, args.alias)
        )
        if args.json:
            print(json.dumps(record.to_json(), indent=2))
        else:
            _print_record(record)
        return
    versions = store.list_versions(args.name)
    nodes = store.node_reports(args.name)
    policies, decisions = _rollout_lines(store, args.name)
    if args.json:
        data = {
            "name": args.name,
            "versions": [v.to_json() for v in versions],
            "nodes": [n.to_json() for n in nodes],
            "rollout_policies": policies,
            "rollout_decisions": decisions,
        }
        print(json.dumps(data, indent=2))
        return
    print(f"{'VERSION':>7}  {'REGISTERED':<20} {'AUTHOR':<16} {'CODE':<12} {'SHA256':<16} ALIASES")
    for record in versions:
        lineage = record.lineage
        print(
            f"{record.version:>7}  {lineage.created_at:<20} {lineage.author[:16]:<16} "
            f"{lineage.code_version[:12]:<12} {record.model_sha256[:16]:<16} "
            f"{', '.join(record.aliases)}"
        )
    if nodes:
        print(f"\n{'NODE':<24} {'VERSION':>7}  {'HEALTH':<10} {'STATE':<12} {'UPDATED':<20} DETAIL")
        for node in nodes:
            version = "-" if node.version is None else str(node.version)
            print(
                f"{node.node:<24} {version:>7}  {node.health:<10} {node.state:<12} "
                f"{node.updated_at:<20} {node.detail[:80]}"
            )
    for alias, policy in sorted(policies.items()):
        steps = ", ".join(
            f"shadow {s['seconds']:g} s" if s["mode"] == "shadow" else f"{s['weight']} %"
            for s in policy.get("steps", [])
        )
        print(f"\nrollout policy of alias {alias}: {steps} -> 100 %")
    if decisions:
        print(f"\n{'AT':<20} {'NODE':<16} {'VERSION':>7}  {'STEP':<24} {'VERDICT':<8} EVIDENCE")
        for d in decisions[-20:]:
            why = "; ".join(d.get("reasons", [])) or json.dumps(d.get("evidence", {}))
            print(
                f"{d.get('at', ''):<20} {str(d.get('node', ''))[:16]:<16} "
                f"{d.get('candidate', ''):>7}  {str(d.get('description', ''))[:24]:<24} "
                f"{d.get('verdict', ''):<8} {why[:120]}"
            )


# ---- agent ---------------------------------------------------------------------------------------


def add_agent(sub: Subparsers) -> None:
    p = sub.add_parser(
        "agent",
        help="keep a server's model at the version a store's alias names",
        description="Poll a store, download the version an alias names (resumable, verified), "
        "validate it (ONNX checker, onnxruntime load, input schema, golden requests), install "
        "it in the server's repository, load it, switch to it, watch its error rate and roll "
        "back on failure. Exposes Prometheus metrics (edgewise_agent_*) over HTTP.",
    )
    _store_argument(p)
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--alias", default="production", help="alias to follow (default production)")
    p.add_argument(
        "--repo", type=Path, required=True, help="the server's model repository (must exist)"
    )
    p.add_argument("--server", default="127.0.0.1:8001", help="server HOST:PORT (gRPC)")
    p.add_argument(
        "--server-metrics",
        help="server's metrics URL, read to watch a new version's error rate (default "
        "http://HOST:PORT/metrics, PORT from EDGEWISE_METRICS_PORT as the server reads it, else "
        "8002); while it cannot be read the new version is not promoted and the agent reports "
        "itself unhealthy",
    )
    p.add_argument("--node-id", help="this node's name in reports (default: the host name)")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between polls (30)")
    p.add_argument("--jitter", type=float, default=0.2, help="poll jitter fraction (0.2)")
    p.add_argument("--backoff-max", type=float, default=300.0, help="longest retry delay (300)")
    p.add_argument("--keep", type=int, default=3, help="versions kept on disk (3)")
    p.add_argument("--max-bytes", type=int, default=1 << 30, help="download cap (1 GiB)")
    p.add_argument("--watch-seconds", type=float, default=60.0, help="watch after a switch (60)")
    p.add_argument("--max-error-rate", type=float, default=0.05, help="rollback threshold (0.05)")
    p.add_argument("--min-requests", type=int, default=20, help="requests before judging (20)")
    p.add_argument("--load-timeout", type=float, default=120.0, help="server load timeout (120)")
    p.add_argument(
        "--no-local-load",
        action="store_true",
        help="skip the onnxruntime load in the agent (golden requests still run on the server)",
    )
    p.add_argument("--require-golden", action="store_true", help="refuse packages without them")
    p.add_argument("--state-dir", type=Path, help="default: REPO/.edgewise-agent")
    p.add_argument("--metrics-host", default="0.0.0.0", help="agent metrics address")
    p.add_argument("--metrics-port", type=int, default=8003, help="0: free port, -1: off (8003)")
    p.add_argument("--port-file", type=Path, help="write the metrics port here when ready")
    p.add_argument("--once", action="store_true", help="poll once and exit (1 if it failed)")
    p.add_argument(
        "--trusted-keys",
        type=Path,
        help="ed25519 public key file or folder: refuse packages not signed by one of them "
        "(keys.json beside them sets a key's not_after, revoked.json revokes keys or packages)",
    )
    p.add_argument(
        "--allow-rollback",
        action="store_true",
        help="deploy a version lower than the highest this node has served when the alias "
        "names one (default: refused, rollback protection; the agent's own rollback of a "
        "failed version and edgewise rollback by hand are always allowed)",
    )
    add_client_security_arguments(p)
    p.set_defaults(handler=_cmd_agent)


def _cmd_agent(args: argparse.Namespace) -> int:
    import socket

    from edgewise.runtime._fs import write_text_atomic
    from edgewise.runtime.agent.sync import Agent, AgentMetrics, AgentSettings
    from edgewise.runtime.client.client import EdgewiseClient
    from edgewise.runtime.frontends.ports import start_metrics_http, stop_http

    settings = AgentSettings(
        model=args.model,
        repo=args.repo,
        server=args.server,
        alias=args.alias,
        node_id=args.node_id or socket.gethostname(),
        interval=args.interval,
        jitter=args.jitter,
        backoff_max=args.backoff_max,
        keep=args.keep,
        max_bytes=args.max_bytes,
        load_timeout=args.load_timeout,
        watch_seconds=args.watch_seconds,
        max_error_rate=args.max_error_rate,
        min_requests=args.min_requests,
        server_metrics=args.server_metrics,
        local_load=not args.no_local_load,
        require_golden=args.require_golden,
        state_dir=args.state_dir,
        trusted_keys=args.trusted_keys,
        allow_rollback=args.allow_rollback,
    )
    store = _open_store(args)
    metrics = AgentMetrics()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    http_server = None
    if args.metrics_port >= 0:
        http_server = start_metrics_http(args.metrics_port, args.metrics_host, metrics.registry)
    if args.port_file:
        port = http_server.server_port if http_server is not None else -1
        write_text_atomic(args.port_file, f"{port}\n")
    client = EdgewiseClient(args.server, security=client_security_from_args(args))
    agent = Agent(settings, store, client, metrics)
    try:
        if args.once:
            return 0 if agent.run_once() else 1
        agent.run(stop)
    finally:
        client.close()
        store.close()
        if http_server is not None:
            stop_http(http_server)
    print(f"edgewise agent: stopped ({args.model})", file=sys.stderr)
    return 0


# ---- rollback ----------------------------------------------------------------------------------


def add_rollback(sub: Subparsers) -> None:
    p = sub.add_parser(
        "rollback",
        help="switch a server back to the previous good version",
        description="Switch the server's default version of NAME back to the last good version "
        "before the deployed one (or --to VERSION), pin it, and record the deployed version as "
        "refused so the agent does not deploy it again until the alias names another version. "
        "While the agent rolls a new version out (docs/rollout.md), the candidate is what goes "
        "back: the rollout is aborted, traffic returns to the stable version at once and the "
        "candidate is refused with the reason 'manual' (--to, if given, must name the stable "
        "version).",
    )
    p.add_argument("name")
    p.add_argument("--repo", type=Path, required=True, help="the server's model repository")
    p.add_argument("--server", default="127.0.0.1:8001", help="server HOST:PORT (gRPC)")
    p.add_argument("--to", type=int, help="the version to go back to")
    p.add_argument("--state-dir", type=Path, help="default: REPO/.edgewise-agent")
    add_client_security_arguments(p)
    p.set_defaults(handler=_cmd_rollback)


def _cmd_rollback(args: argparse.Namespace) -> int:
    from edgewise.runtime.agent.sync import rollback
    from edgewise.runtime.client.client import EdgewiseClient

    with EdgewiseClient(args.server, security=client_security_from_args(args)) as client:
        before, after = rollback(args.repo, args.name, client, to=args.to, state_dir=args.state_dir)
    print(f"{args.name}: rolled back from version {before} to version {after}")
    return 0


# ---- keys ----------------------------------------------------------------------------------------


def _key_name(text: str) -> str:
    """A key pair's file name stem: the safe-name rule of model names (no path parts)."""
    from edgewise.runtime.package.manifest import validate_model_name

    try:
        return validate_model_name(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(
            exc.message.replace(f"model name {text!r}", f"key name {text!r}", 1)
        ) from None


def add_keys(sub: Subparsers) -> None:
    p = sub.add_parser(
        "keys",
        help="make ed25519 keys and sign or verify model packages",
        description="Signed model packages: a detached manifest.sig signs the model name, the "
        "version number, the sha256 of manifest.json and of every file it lists, and the "
        "sections of the model's config.json that decide how it serves (monitoring, batching, "
        "quality, capture, features; not the version pins). Servers (serve --trusted-keys), "
        "agents and batch (--trusted-keys) "
        "refuse a package whose signature does not verify, whose key expired (keys.json beside "
        "the trusted keys) or is revoked (revoked.json beside them), or that is placed under "
        "another version number or config.json than it was signed with.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = actions.add_parser("generate", help="write NAME.key (private) and NAME.pub")
    generate.add_argument("--out", type=Path, required=True, help="folder for the two files")
    generate.add_argument(
        "--name", type=_key_name, default="edgewise", help="file name stem (default edgewise)"
    )
    sign = actions.add_parser(
        "sign",
        help="sign a package folder in place, as the version its folder names, with its "
        "model's config.json",
    )
    sign.add_argument("package", type=Path, help="the package folder REPO/NAME/VERSION")
    sign.add_argument("--key", type=Path, required=True, help="ed25519 private key")
    verify = actions.add_parser(
        "verify", help="check a package's signature (as the version its folder names) and files"
    )
    verify.add_argument("package", type=Path, help="the package folder REPO/NAME/VERSION")
    verify.add_argument(
        "--trusted-keys",
        type=Path,
        required=True,
        help="public key file or folder (with its keys.json and revoked.json, if any)",
    )
    p.set_defaults(handler=_cmd_keys)


def _package_version(folder: Path) -> int:
    name = folder.absolute().name
    if not name.isascii() or not name.isdigit() or name.startswith("0"):
        raise InvalidInput(f"{folder}: not a package folder REPO/NAME/VERSION (VERSION >= 1)")
    return int(name)


def _cmd_keys(args: argparse.Namespace) -> int:
    from edgewise.runtime.package.manifest import read_manifest, verify_files
    from edgewise.runtime.package.signing import (
        TrustedKeys,
        generate_keypair,
        sign_package,
        verify_package,
    )

    if args.action == "generate":
        private, public, kid = generate_keypair(args.out, args.name)
        print(f"key {kid}: private {private} (keep it secret), public {public} (trust it)")
        return 0
    package = args.package.absolute()
    version = _package_version(package)
    if args.action == "sign":
        manifest = read_manifest(package)
        verify_files(package, manifest)  # never sign files that do not match
        path = sign_package(package, args.key, version=version)
        print(f"signed {args.package} ({manifest.name} version {version}): {path}")
        return 0
    trusted = TrustedKeys.load(args.trusted_keys)
    manifest = read_manifest(package)
    signature = verify_package(package, trusted, name=manifest.name, version=version)
    verify_files(package, manifest)
    statement = signature.statement
    print(
        f"{args.package}: signature by key {statement.key_id} (signed {statement.signed_at}) "
        f"verifies for {manifest.name} version {version}; {len(manifest.files)} file(s) and "
        f"config.json match; manifest sha256 {statement.manifest_sha256}"
    )
    return 0
