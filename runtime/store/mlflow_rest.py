"""The MLflow Model Registry as the central store, over its REST API with the standard library only
(an edge node needs no mlflow install).

How a version is laid out in MLflow:

- a registered model per edgewise model; a model version per ``edgewise register``;
- the package files are uploaded through the tracking server's artifact proxy
  (``mlflow server --serve-artifacts``) into a run of the experiment ``edgewise``, under
  ``package/``; the run also gets the training parameters and metrics (so they show in the MLflow
  UI) and the version's ``source`` points at that folder;
- lineage goes into version tags, including what MLflow does not keep (the sha256 and size of
  every file): ``edgewise.files`` (JSON), ``edgewise.model_sha256``, ``edgewise.lineage`` (JSON),
  plus readable copies ``edgewise.code_version``, ``edgewise.data_fingerprint``,
  ``edgewise.author``, ``edgewise.created_at``;
- aliases (MLflow 2.9+) name the version to deploy;
- each node reports into a registered-model tag ``edgewise.node.<node id>`` (JSON).

Downloads use ``GET /api/2.0/mlflow-artifacts/artifacts/<path>`` with ``Range`` to resume. HTTP
Basic credentials are sent with every request; redirects are not followed (so credentials never
travel to another host). Every failure is an edgewise error: refused connections, timeouts, 5xx
and 429 are :class:`StoreUnavailable`; 401/403 :class:`StoreAuthError`; a missing model, version,
alias or file :class:`ModelNotFound`.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from edgewise.runtime.errors import EdgewiseError, InvalidInput, ModelNotFound, PackageError
from edgewise.runtime.package.manifest import MODEL_FILE, FileEntry, validate_model_name
from edgewise.runtime.store.base import (
    FileStream,
    Lineage,
    ModelSummary,
    NodeReport,
    StoreAuthError,
    StoreUnavailable,
    VersionRecord,
    safe_join,
    validate_alias,
    validate_artifact_path,
    validate_node_id,
)

__all__ = ["MlflowHttp", "MlflowStore"]

EXPERIMENT: Final = "edgewise"
PACKAGE_DIR: Final = "package"
TAG_FORMAT: Final = "edgewise.format"
TAG_FILES: Final = "edgewise.files"
TAG_MODEL_SHA: Final = "edgewise.model_sha256"
TAG_LINEAGE: Final = "edgewise.lineage"
NODE_TAG_PREFIX: Final = "edgewise.node."
_ARTIFACTS_API: Final = "/api/2.0/mlflow-artifacts/artifacts"
_PARAM_VALUE_MAX: Final = 6000
_USER_AGENT: Final = "edgewise-store/1"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx becomes an HTTPError: credentials never follow a redirect


def _message(body: bytes) -> tuple[str, str]:
    """``(error_code, message)`` from an MLflow error body (or the start of any other body)."""
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            return str(data.get("error_code", "")), str(data.get("message", ""))[:300]
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    return "", body[:200].decode("utf-8", "replace").strip().replace("\n", " ")


class _ResponseStream:
    """A :class:`FileStream` over an HTTP response; read errors become :class:`StoreUnavailable`."""

    def __init__(self, response: http.client.HTTPResponse, offset: int, what: str) -> None:
        self._response = response
        self.offset = offset
        self._what = what
        self._broken: str | None = None

    def read(self, size: int) -> bytes:
        if self._broken is not None:
            raise StoreUnavailable(f"{self._what}: connection lost mid-download: {self._broken}")
        try:
            return self._response.read(size)
        except http.client.IncompleteRead as exc:
            # Hand out what did arrive (it is resumable), fail on the next read.
            self._broken = f"IncompleteRead after {len(exc.partial)} more bytes"
            if exc.partial:
                return bytes(exc.partial)
            raise StoreUnavailable(f"{self._what}: connection lost mid-download") from None
        except (OSError, http.client.HTTPException) as exc:
            raise StoreUnavailable(
                f"{self._what}: connection lost mid-download: {type(exc).__name__}: {exc}"
            ) from None

    def close(self) -> None:
        self._response.close()


class MlflowHttp:
    """A small JSON-over-HTTP client for an MLflow tracking server."""

    def __init__(
        self,
        base_url: str,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._headers = {"User-Agent": _USER_AGENT}
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self._opener = urllib.request.build_opener(_NoRedirect())

    def _url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        url = self.base_url + path
        if params:
            url += "?" + urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        return url

    def open(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        data: bytes | Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> http.client.HTTPResponse:
        """Send a request; the open response on 2xx, an edgewise error otherwise."""
        request = urllib.request.Request(
            self._url(path, params),
            data=data,
            method=method,
            headers={**self._headers, **(headers or {})},
        )
        what = f"MLflow at {self.base_url}: {method} {path}"
        try:
            response = self._opener.open(
                request, timeout=self.timeout if timeout is None else timeout
            )
        except urllib.error.HTTPError as exc:
            with exc:
                body = exc.read(4096) if exc.fp is not None else b""
            self._raise_for(exc.code, body, what)
            raise AssertionError("unreachable") from None  # _raise_for always raises
        except urllib.error.URLError as exc:
            raise StoreUnavailable(f"{what}: cannot connect: {exc.reason}") from None
        except TimeoutError:
            raise StoreUnavailable(f"{what}: timed out after {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}") from None
        assert isinstance(response, http.client.HTTPResponse)
        return response

    @staticmethod
    def _raise_for(status: int, body: bytes, what: str) -> None:
        code, message = _message(body)
        detail = f"{what}: HTTP {status} {code or ''} {message}".rstrip()
        if status in (401, 403):
            raise StoreAuthError(f"{detail} (check the store's credentials)")
        if status == 404 or code == "RESOURCE_DOES_NOT_EXIST":
            raise ModelNotFound(detail)
        if status == 400 and "not found" in message.lower():
            raise ModelNotFound(detail)  # MLflow answers a missing alias with 400
        if status == 429 or status >= 500:
            raise StoreUnavailable(detail)
        if code == "RESOURCE_ALREADY_EXISTS":
            raise _AlreadyExists(detail)
        if 300 <= status < 400:
            raise StoreUnavailable(f"{detail}: redirects are not followed")
        raise InvalidInput(detail)

    def call(
        self,
        method: str,
        endpoint: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A REST call under ``/api/2.0/mlflow/``; the decoded JSON object."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else {}
        path = f"/api/2.0/mlflow/{endpoint}"
        with self.open(method, path, params=params, data=data, headers=headers) as response:
            try:
                raw = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise StoreUnavailable(f"MLflow {endpoint}: connection lost: {exc}") from None
        try:
            decoded = json.loads(raw) if raw.strip() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreUnavailable(
                f"MLflow at {self.base_url}: {endpoint} did not answer JSON (is it an MLflow "
                "tracking server?)"
            ) from None
        if not isinstance(decoded, dict):
            raise StoreUnavailable(f"MLflow at {self.base_url}: {endpoint}: unexpected answer")
        return decoded


class _AlreadyExists(EdgewiseError):
    """MLflow's RESOURCE_ALREADY_EXISTS (handled inside this module)."""


def _tags(items: Any) -> dict[str, str]:
    if isinstance(items, dict):
        return {str(k): str(v) for k, v in items.items()}
    if items is not None and not isinstance(items, list):
        raise PackageError(f"MLflow returned tags that are not a list: {str(items)[:80]!r}")
    try:
        return {str(t["key"]): str(t.get("value", "")) for t in items or ()}
    except (KeyError, TypeError, AttributeError):
        raise PackageError(f"MLflow returned malformed tags: {str(items)[:80]!r}") from None


def _quote_path(path: str) -> str:
    return "/".join(urllib.parse.quote(segment, safe="") for segment in path.split("/"))


class MlflowStore:
    """The MLflow Model Registry as an edgewise store (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.http = MlflowHttp(base_url, username, password, timeout)
        self.uri = self.http.base_url
        self._locations: dict[tuple[str, int], str] = {}

    def close(self) -> None:
        self._locations.clear()

    # ---- reading ------------------------------------------------------------------------------

    def _record(self, data: Mapping[str, Any]) -> VersionRecord:
        if not isinstance(data, Mapping):
            raise StoreUnavailable(
                f"MLflow at {self.uri}: a model version that is not a JSON object: "
                f"{str(data)[:80]!r}"
            )
        name = str(data.get("name", ""))
        try:
            version = int(data["version"])
        except (KeyError, TypeError, ValueError):
            raise PackageError(
                f"MLflow returned a model version without a number: {data}"
            ) from None
        tags = _tags(data.get("tags"))
        where = f"MLflow model {name!r} version {version}"
        if TAG_FILES not in tags or TAG_MODEL_SHA not in tags:
            raise PackageError(
                f"{where} was not registered by edgewise (no {TAG_FILES} / {TAG_MODEL_SHA} tags)"
            )
        try:
            files = tuple(FileEntry.from_json(f) for f in json.loads(tags[TAG_FILES]))
            lineage = Lineage.from_json(json.loads(tags.get(TAG_LINEAGE, "{}")))
        except (json.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
            raise PackageError(f"{where}: malformed edgewise tags: {exc}") from None
        for entry in files:
            validate_artifact_path(entry.path)
        aliases = tuple(str(a) for a in data.get("aliases", ()) or ())
        return VersionRecord(
            name=name,
            version=version,
            model_sha256=tags[TAG_MODEL_SHA],
            files=files,
            lineage=lineage,
            aliases=aliases,
            description=str(data.get("description", "")),
            location=str(data.get("source", "")),
        )

    def get_version(self, name: str, version: int) -> VersionRecord:
        validate_model_name(name)
        data = self.http.call(
            "GET", "model-versions/get", params={"name": name, "version": version}
        )
        return self._record(data.get("model_version", {}))

    def resolve_alias(self, name: str, alias: str) -> VersionRecord:
        validate_model_name(name)
        validate_alias(alias)
        data = self.http.call(
            "GET", "registered-models/alias", params={"name": name, "alias": alias}
        )
        return self._record(data.get("model_version", {}))

    def _pages(self, endpoint: str, key: str, params: Mapping[str, Any]) -> Iterator[Any]:
        token = ""
        while True:
            page = dict(params)
            if token:
                page["page_token"] = token
            data = self.http.call("GET", endpoint, params=page)
            yield from data.get(key, ())
            token = str(data.get("next_page_token", ""))
            if not token:
                return

    def list_versions(self, name: str) -> list[VersionRecord]:
        validate_model_name(name)
        try:
            self.http.call("GET", "registered-models/get", params={"name": name})
        except ModelNotFound:  # 404: the words the embedded store uses, not MLflow's
            raise ModelNotFound(f"store {self.uri} has no model {name!r}") from None
        records = []
        params = {
            "filter": f"name='{name}'",
            "order_by": "version_number DESC",
            "max_results": 200,
        }
        for item in self._pages("model-versions/search", "model_versions", params):
            try:
                records.append(self._record(item))
            except PackageError:
                continue  # a version not made by edgewise: not ours to list
        return records

    def list_models(self) -> list[ModelSummary]:
        summaries = []
        for item in self._pages(
            "registered-models/search", "registered_models", {"max_results": 100}
        ):
            latest = [int(v["version"]) for v in item.get("latest_versions", ()) or ()]
            aliases = {str(a["alias"]): int(a["version"]) for a in item.get("aliases", ()) or ()}
            summaries.append(
                ModelSummary(
                    name=str(item["name"]),
                    latest_version=max(latest) if latest else None,
                    aliases=aliases,
                    description=str(item.get("description", "")),
                )
            )
        return sorted(summaries, key=lambda s: s.name)

    # ---- aliases -------------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> None:
        validate_model_name(name)
        validate_alias(alias)
        self.http.call(
            "POST",
            "registered-models/alias",
            body={"name": name, "alias": alias, "version": str(version)},
        )

    def delete_alias(self, name: str, alias: str) -> None:
        validate_model_name(name)
        validate_alias(alias)
        self.resolve_alias(name, alias)  # MLflow deletes a missing alias silently
        self.http.call("DELETE", "registered-models/alias", body={"name": name, "alias": alias})

    # ---- artifacts -----------------------------------------------------------------------------

    def _artifact_root(self, uri: str, where: str) -> str:
        """The artifact-proxy path (after ``mlflow-artifacts:/``) of a download URI."""
        parsed = urllib.parse.urlsplit(uri)
        if parsed.scheme == "mlflow-artifacts":
            path = parsed.path.strip("/")
        elif parsed.scheme == "runs":
            run_id = parsed.netloc or parsed.path.strip("/").split("/", 1)[0]
            sub = parsed.path.strip("/")
            if not parsed.netloc:
                sub = sub.split("/", 1)[1] if "/" in sub else ""
            run = self.http.call("GET", "runs/get", params={"run_id": run_id})
            artifact_uri = str(run.get("run", {}).get("info", {}).get("artifact_uri", ""))
            root = self._artifact_root(artifact_uri, where)
            path = f"{root}/{sub}".strip("/")
        else:
            raise PackageError(
                f"{where}: artifacts at {uri!r} cannot be fetched through the tracking server "
                "(run it with --serve-artifacts so artifacts are mlflow-artifacts:/ URIs)"
            )
        for segment in path.split("/"):
            if segment in ("", ".", ".."):
                raise PackageError(f"{where}: unsafe artifact location {uri!r}")
        return path

    def _location(self, record: VersionRecord) -> str:
        key = (record.name, record.version)
        cached = self._locations.get(key)
        if cached is None:
            data = self.http.call(
                "GET",
                "model-versions/get-download-uri",
                params={"name": record.name, "version": record.version},
            )
            where = f"MLflow model {record.name!r} version {record.version}"
            cached = self._artifact_root(str(data.get("artifact_uri", "")), where)
            self._locations[key] = cached
        return cached

    def open_file(self, record: VersionRecord, entry: FileEntry, offset: int = 0) -> FileStream:
        validate_artifact_path(entry.path)
        root = self._location(record)
        path = f"{_ARTIFACTS_API}/{_quote_path(root)}/{_quote_path(entry.path)}"
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        what = f"MLflow {record.name} version {record.version} {entry.path}"
        try:
            response = self.http.open("GET", path, headers=headers)
        except InvalidInput as exc:
            if offset > 0 and "416" in exc.message:
                return self.open_file(record, entry, 0)  # past the end: start over
            raise
        start = 0
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            try:
                start = int(content_range.split(" ", 1)[1].split("-", 1)[0])
            except (IndexError, ValueError):
                response.close()
                raise StoreUnavailable(f"{what}: bad Content-Range {content_range!r}") from None
            if start != offset:
                response.close()
                return self.open_file(record, entry, 0)
        return _ResponseStream(response, start, what)

    # ---- nodes ---------------------------------------------------------------------------------

    def report_node(self, report: NodeReport) -> None:
        validate_model_name(report.model)
        validate_node_id(report.node)
        self.http.call(
            "POST",
            "registered-models/set-tag",
            body={
                "name": report.model,
                "key": NODE_TAG_PREFIX + report.node,
                "value": json.dumps(report.to_json(), sort_keys=True),
            },
        )

    def set_model_tag(self, name: str, key: str, value: str | None) -> None:
        validate_model_name(name)
        if value is None:
            if key in self.model_tags(name, key):
                self.http.call(
                    "DELETE", "registered-models/delete-tag", body={"name": name, "key": key}
                )
            return
        self.http.call(
            "POST", "registered-models/set-tag", body={"name": name, "key": key, "value": value}
        )

    def model_tags(self, name: str, prefix: str = "") -> dict[str, str]:
        validate_model_name(name)
        data = self.http.call("GET", "registered-models/get", params={"name": name})
        tags = _tags(data.get("registered_model", {}).get("tags"))
        return {k: v for k, v in sorted(tags.items()) if k.startswith(prefix)}

    def node_reports(self, name: str) -> list[NodeReport]:
        validate_model_name(name)
        data = self.http.call("GET", "registered-models/get", params={"name": name})
        tags = _tags(data.get("registered_model", {}).get("tags"))
        reports = []
        for key, value in sorted(tags.items()):
            if not key.startswith(NODE_TAG_PREFIX):
                continue
            try:
                reports.append(NodeReport.from_json(json.loads(value)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # somebody else's tag with our prefix: ignore it
        return reports

    # ---- publishing ----------------------------------------------------------------------------

    def _experiment_id(self) -> str:
        for _ in range(3):
            try:
                data = self.http.call(
                    "GET", "experiments/get-by-name", params={"experiment_name": EXPERIMENT}
                )
                return str(data["experiment"]["experiment_id"])
            except ModelNotFound:
                pass
            try:
                created = self.http.call("POST", "experiments/create", body={"name": EXPERIMENT})
                return str(created["experiment_id"])
            except _AlreadyExists:
                continue  # created meanwhile by a concurrent publisher
        raise StoreUnavailable(f"MLflow at {self.uri}: cannot create experiment {EXPERIMENT!r}")

    def _log_run(self, run_id: str, lineage: Lineage) -> None:
        params = [
            {"key": k[:250], "value": v[:_PARAM_VALUE_MAX]} for k, v in lineage.params.items()
        ]
        now = int(time.time() * 1000)
        metrics = [
            {"key": k[:250], "value": v, "timestamp": now, "step": 0}
            for k, v in lineage.metrics.items()
        ]
        for start in range(0, max(len(params), len(metrics), 1), 100):
            batch: dict[str, Any] = {"run_id": run_id}
            if params[start : start + 100]:
                batch["params"] = params[start : start + 100]
            if metrics[start : start + 100]:
                batch["metrics"] = metrics[start : start + 100]
            if len(batch) > 1:
                self.http.call("POST", "runs/log-batch", body=batch)

    def _upload(self, root: str, folder: Path, entry: FileEntry) -> None:
        source = safe_join(folder, entry.path)
        path = f"{_ARTIFACTS_API}/{_quote_path(root)}/{PACKAGE_DIR}/{_quote_path(entry.path)}"
        with source.open("rb") as handle:
            headers = {
                "Content-Length": str(entry.size),
                "Content-Type": "application/octet-stream",
            }
            with self.http.open("PUT", path, data=handle, headers=headers) as response:
                response.read()

    def _check_uploaded(self, root: str, files: tuple[FileEntry, ...]) -> None:
        """Compare the sizes the artifact store lists with the package's (MLflow keeps sizes)."""
        sizes: dict[str, int] = {}
        folders = {"/".join(f.path.split("/")[:-1]) for f in files}
        for folder in sorted(folders):
            path = f"{root}/{folder}".rstrip("/")
            with self.http.open("GET", _ARTIFACTS_API, params={"path": path}) as response:
                try:
                    listing = json.loads(response.read())
                except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
                    raise StoreUnavailable(f"MLflow artifact listing of {path}: {exc}") from None
            for item in listing.get("files", ()):
                if not item.get("is_dir"):
                    key = f"{folder}/{item['path']}".strip("/")
                    sizes[key] = int(item.get("file_size", -1))
        for entry in files:
            if sizes.get(entry.path) != entry.size:
                raise StoreUnavailable(
                    f"MLflow at {self.uri}: uploaded {entry.path} is listed with "
                    f"{sizes.get(entry.path)} bytes, expected {entry.size}"
                )

    def publish(
        self,
        name: str,
        folder: Path,
        files: tuple[FileEntry, ...],
        lineage: Lineage,
        description: str = "",
    ) -> VersionRecord:
        validate_model_name(name)
        model_sha = next((f.sha256 for f in files if f.path == MODEL_FILE), None)
        if model_sha is None:
            raise PackageError(f"{folder}: the package has no {MODEL_FILE}")
        for entry in files:
            validate_artifact_path(entry.path)
        with contextlib.suppress(_AlreadyExists):
            self.http.call("POST", "registered-models/create", body={"name": name})
        experiment = self._experiment_id()
        run_tags = [
            {"key": "mlflow.runName", "value": f"register {name}"},
            {"key": "mlflow.user", "value": lineage.author},
            {"key": "edgewise.model", "value": name},
        ]
        if lineage.code_version != "unknown":
            run_tags.append({"key": "mlflow.source.git.commit", "value": lineage.code_version})
        run = self.http.call(
            "POST",
            "runs/create",
            body={
                "experiment_id": experiment,
                "run_name": f"register {name}",
                "start_time": int(time.time() * 1000),
                "tags": run_tags,
            },
        )["run"]["info"]
        run_id, artifact_uri = str(run["run_id"]), str(run["artifact_uri"])
        status = "FAILED"
        try:
            root = self._artifact_root(artifact_uri, f"MLflow run {run_id}")
            self._log_run(run_id, lineage)
            for entry in files:
                self._upload(root, folder, entry)
            self._check_uploaded(f"{root}/{PACKAGE_DIR}", files)
            tags = {
                "edgewise.format": "1",
                TAG_MODEL_SHA: model_sha,
                TAG_FILES: json.dumps([f.to_json() for f in files]),
                TAG_LINEAGE: json.dumps(lineage.to_json(), sort_keys=True),
                "edgewise.code_version": lineage.code_version,
                "edgewise.data_fingerprint": lineage.data_fingerprint,
                "edgewise.author": lineage.author,
                "edgewise.created_at": lineage.created_at,
            }
            created = self.http.call(
                "POST",
                "model-versions/create",
                body={
                    "name": name,
                    "source": f"{artifact_uri}/{PACKAGE_DIR}",
                    "run_id": run_id,
                    "description": description,
                    "tags": [{"key": k, "value": v} for k, v in tags.items()],
                },
            )
            status = "FINISHED"
        finally:
            try:
                self.http.call(
                    "POST",
                    "runs/update",
                    body={"run_id": run_id, "status": status, "end_time": int(time.time() * 1000)},
                )
            except EdgewiseError:
                if status == "FINISHED":
                    raise
        return self._record(created["model_version"])
