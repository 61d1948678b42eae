"""``edgewise convert``: a fitted scikit-learn model and a sample of its data become a package.

The model goes through skl2onnx with a fixed target opset, its outputs become plain tensors with
stable names (classifiers: ``label`` [batch] and ``probabilities`` [batch, n_classes], no ZipMap;
regressors: ``predictions``), and its inputs take the package's form (see
:mod:`edgewise.runtime.package.schema`): every numeric column packed into one FP32 ``features``
tensor, every categorical column its own BYTES ``[batch, 1]`` tensor named after the column.

For a model fit on numbers only, skl2onnx's single ``[None, n]`` float input *is* ``features``. A
model with a ``ColumnTransformer`` (or any categorical column) selects columns by name, so it is
converted with one input per column and the graph is then rewritten: a new ``features`` input is
split by ``Gather`` nodes along axis 1 into the former per-column inputs (with a ``Cast`` where a
column was an integer), which are removed from the graph inputs.

The converted model must reproduce the original on the sample (and on held-out rows when given):
probabilities against ``predict_proba`` within ``atol``, labels against ``predict`` (a label may
differ only where the top two probabilities tie within ``atol``), predictions against ``predict``
within ``atol + rtol * |prediction|``. The figures are recorded in the manifest. Everything is
checked in memory first and the package is published atomically (:func:`package.staging_dir`), so
a failure leaves nothing in the repository.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np

from edgewise.runtime.errors import ConversionError, EdgewiseError, InvalidInput
from edgewise.runtime.package.datatypes import datatype_of
from edgewise.runtime.package.golden import add_golden, golden_inputs_from_sample
from edgewise.runtime.package.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    Feature,
    FileEntry,
    Manifest,
    Task,
    TensorSpec,
    file_entry,
    list_versions,
    read_manifest,
    sha256_file,
    staging_dir,
    validate_model_name,
    write_manifest,
)
from edgewise.runtime.package.performance_estimation import fit_for_package, write_calibration
from edgewise.runtime.package.reference_profile import ReferenceOutputs
from edgewise.runtime.package.reference_profile import profile_builder as default_profile_builder
from edgewise.runtime.package.schema import (
    FEATURES_INPUT,
    frame_to_inputs,
    infer_features,
    input_specs,
    onnxruntime_inputs,
)
from edgewise.runtime.package.tabular import (
    load_table,
    require_module,
    require_pandas,
    table_format,
)

if TYPE_CHECKING:
    import onnx
    import pandas as pd

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_ML_OPSET",
    "DEFAULT_OPSET",
    "DEFAULT_RTOL",
    "LABEL_OUTPUT",
    "MODEL_SUFFIXES",
    "PREDICTIONS_OUTPUT",
    "PROBABILITIES_OUTPUT",
    "SCORES_OUTPUT",
    "ConvertResult",
    "ProfileBuilder",
    "convert",
    "convert_files",
    "frame_to_inputs",
    "load_model",
    "opset_range",
    "require_converter",
    "to_onnx",
]

DEFAULT_OPSET: Final = 17
"""Target ``ai.onnx`` opset: supported by onnxruntime 1.14+ (the project needs 1.18+)."""
DEFAULT_ML_OPSET: Final = 3
"""Target ``ai.onnx.ml`` opset: supported by onnxruntime 1.11+."""
DEFAULT_ATOL: Final = 1e-4
DEFAULT_RTOL: Final = 1e-5
"""Relative slack on top of ``atol`` for unbounded outputs (regression predictions, transforms):
float32 inference of a regressor whose outputs are in the thousands cannot match float64 to 1e-4
absolute. Probabilities are held to ``atol`` alone."""

LABEL_OUTPUT: Final = "label"
PROBABILITIES_OUTPUT: Final = "probabilities"
SCORES_OUTPUT: Final = "scores"  # a classifier without predict_proba (e.g. LinearSVC)
PREDICTIONS_OUTPUT: Final = "predictions"

MODEL_SUFFIXES: Final = (".joblib", ".pkl", ".pickle")

_ML_DOMAIN: Final = "ai.onnx.ml"
_MIN_OPSET: Final = 9
_SUMMARY_LIMIT: Final = 500
_LIBRARIES: Final = (
    ("edgewise", "edgewise"),
    ("numpy", "numpy"),
    ("onnx", "onnx"),
    ("onnxruntime", "onnxruntime"),
    ("pandas", "pandas"),
    ("scikit-learn", "scikit-learn"),
    ("skl2onnx", "skl2onnx"),
)


class ProfileBuilder(Protocol):
    """The hook that writes a reference profile into a package before it is published.

    Called with the staging folder, the sample (a DataFrame with the model's columns in feature
    order) and the features. It writes its files (e.g. ``profile.json``) into ``folder`` and
    returns the manifest's ``profile`` entry (e.g. ``{"file": "profile.json", "format": ...}``),
    or None for no profile. Every file it writes is listed, with its sha256, in the manifest.
    """

    def __call__(
        self, folder: Path, sample: pd.DataFrame, features: tuple[Feature, ...]
    ) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True)
class ConvertResult:
    """A published package: ``path`` is ``repo/name/version``."""

    name: str
    version: int
    path: Path
    manifest: Manifest

    @property
    def parity(self) -> Mapping[str, Any]:
        return self.manifest.parity


# --------------------------------------------------------------------------------------------
# small helpers


def _one_line(exc: BaseException | str, limit: int = 300) -> str:
    text = exc if isinstance(exc, str) else str(exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else (type(exc).__name__ if not isinstance(exc, str) else "")
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _class_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _format_names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _library_versions() -> dict[str, str]:
    versions = {}
    for key, dist in _LIBRARIES:
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = "unknown"
    return versions


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def opset_range() -> tuple[int, int]:
    """The ``ai.onnx`` opsets the converter targets: (lowest, the installed onnx's latest)."""
    onnx_lib = require_module("onnx", "conversion")
    return _MIN_OPSET, int(onnx_lib.defs.onnx_opset_version())


def _target_opsets(opset: int | Mapping[str, int] | None) -> dict[str, int]:
    if opset is None:
        target = {"": DEFAULT_OPSET, _ML_DOMAIN: DEFAULT_ML_OPSET}
    elif isinstance(opset, Mapping):
        target = {str(k): int(v) for k, v in opset.items()}
        target.setdefault("", DEFAULT_OPSET)
        target.setdefault(_ML_DOMAIN, DEFAULT_ML_OPSET)
    elif isinstance(opset, int) and not isinstance(opset, bool):
        target = {"": opset, _ML_DOMAIN: DEFAULT_ML_OPSET}
    else:
        raise InvalidInput(f"opset: expected an integer, got {opset!r}")
    _, latest = opset_range()
    if not _MIN_OPSET <= target[""] <= latest:
        raise InvalidInput(
            f"opset: {target['']} is not supported; choose {_MIN_OPSET} to {latest} "
            f"(default {DEFAULT_OPSET})"
        )
    if target[_ML_DOMAIN] < 1:
        raise InvalidInput(f"opset: ai.onnx.ml opset {target[_ML_DOMAIN]} is not valid")
    return target


# --------------------------------------------------------------------------------------------
# loading


def load_model(path: Path | str) -> Any:
    """Unpickle a model saved with joblib or pickle (``.joblib``, ``.pkl``, ``.pickle``).

    Unpickling runs code from the file: load only models you trust. Any failure is one
    :class:`InvalidInput` line naming the file.
    """
    path = Path(path)
    if not path.name.lower().endswith(MODEL_SUFFIXES):
        raise InvalidInput(f"{path}: expected a .joblib or .pkl model file")
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    joblib = require_module("joblib", "loading .joblib/.pkl models")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. sklearn's InconsistentVersionWarning
            return joblib.load(path)
    except MemoryError:
        raise
    except Exception as exc:  # unpickling raises anything: EOFError, KeyError, ImportError, ...
        raise InvalidInput(
            f"{path}: cannot load the model (corrupt, truncated or not a joblib/pickle file?): "
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from None


# --------------------------------------------------------------------------------------------
# the model and its sample


def require_converter(purpose: str = "edgewise convert") -> None:
    """scikit-learn and skl2onnx are here (the ``edgewise[convert]`` extra), else
    :class:`~edgewise.runtime.package.tabular.MissingDependency` naming the extra."""
    for module in ("sklearn", "skl2onnx"):
        require_module(module, purpose, extra="convert")


def _check_model(model: Any) -> None:
    from sklearn.base import BaseEstimator
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if not isinstance(model, BaseEstimator):
        raise ConversionError(
            f"model: expected a fitted scikit-learn estimator or pipeline, got {_class_name(model)}"
        )
    try:
        check_is_fitted(model)
    except NotFittedError:
        raise ConversionError(f"model: the {type(model).__name__} is not fitted") from None
    except TypeError as exc:
        raise ConversionError(f"model: {_one_line(exc)}") from None


def _fit_names(model: Any) -> list[str] | None:
    names = getattr(model, "feature_names_in_", None)
    return None if names is None else [str(n) for n in names]


def _prepare_frame(model: Any, data: Any, role: str) -> tuple[pd.DataFrame, bool]:
    """The table as a DataFrame in the model's column order, and whether it is positional.

    Arrays (and ``.npy`` tables) have no column names of their own: their columns are taken in
    the order the model was fit on.
    """
    pd = require_pandas()
    names = _fit_names(model)
    if isinstance(data, pd.DataFrame):
        frame = data
    elif isinstance(data, np.ndarray):
        if data.ndim != 2:
            raise InvalidInput(f"{role}: expected a 2-D array, got shape {list(data.shape)}")
        if names is not None and len(names) == data.shape[1]:
            frame = pd.DataFrame(data, columns=names)
        else:
            frame = pd.DataFrame(data, columns=[f"f{i}" for i in range(data.shape[1])])
    else:
        raise InvalidInput(
            f"{role}: expected a pandas DataFrame or a 2-D numpy array, got {type(data).__name__}"
        )
    if len(frame) == 0:
        raise InvalidInput(f"{role}: has no rows")
    if frame.shape[1] == 0:
        raise InvalidInput(f"{role}: has no columns")
    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        raise InvalidInput(f"{role}: duplicate column names")
    if names is not None:
        present = set(columns)
        missing = [n for n in names if n not in present]
        if missing:
            raise InvalidInput(
                f"{role}: missing column(s) the model was fit on: {_format_names(missing)}"
            )
        wanted = set(names)
        extra = [c for c in columns if c not in wanted]
        if extra:
            raise InvalidInput(
                f"{role}: column(s) the model was not fit on: {_format_names(extra)} "
                "(drop them, e.g. the target)"
            )
        frame = frame.rename(columns={c: str(c) for c in frame.columns})[names]
    else:
        n_in = getattr(model, "n_features_in_", None)
        if n_in is not None and frame.shape[1] != int(n_in):
            raise InvalidInput(
                f"{role}: {frame.shape[1]} column(s), but the model was fit on {int(n_in)} features"
            )
        frame = frame.rename(columns={c: str(c) for c in frame.columns})
    return frame, names is None


def _model_input(frame: pd.DataFrame, positional: bool) -> Any:
    """What the original model is called with: a model fit without names gets an array."""
    return frame.to_numpy() if positional else frame


def _task_of(model: Any) -> Task:
    from sklearn.base import is_classifier, is_regressor

    if is_classifier(model):
        return "classification"
    if is_regressor(model):
        return "regression"
    return "other"


def _has_column_transformer(model: Any) -> bool:
    from sklearn.compose import ColumnTransformer

    if isinstance(model, ColumnTransformer):
        return True
    try:
        params = model.get_params(deep=True)
    except Exception:  # a third-party estimator with an unusual get_params
        return False
    return any(isinstance(value, ColumnTransformer) for value in params.values())


def _source_summary(model: Any) -> dict[str, Any]:
    summary = " ".join(repr(model).split())
    if len(summary) > _SUMMARY_LIMIT:
        summary = summary[: _SUMMARY_LIMIT - 3] + "..."
    source: dict[str, Any] = {"estimator": _class_name(model), "summary": summary}
    steps = getattr(model, "steps", None)
    if isinstance(steps, list):
        source["steps"] = [f"{step}: {_class_name(est)}" for step, est in steps]
    n_in = getattr(model, "n_features_in_", None)
    if n_in is not None:
        source["n_features_in"] = int(n_in)
    return source


# --------------------------------------------------------------------------------------------
# ONNX graph editing


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    onnx_lib = require_module("onnx", "conversion")
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx_lib.AttributeProto.GRAPH:
                yield attribute.g
                yield from _subgraphs(attribute.g)
            elif attribute.type == onnx_lib.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield sub
                    yield from _subgraphs(sub)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for g in (graph, *_subgraphs(graph)):
        names.update(v.name for v in g.input)
        names.update(v.name for v in g.output)
        names.update(v.name for v in g.value_info)
        names.update(t.name for t in g.initializer)
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
            names.add(node.name)
    names.discard("")
    return names


def _fresh_name(taken: set[str], seed: str) -> str:
    candidate, i = seed, 0
    while candidate in taken:
        i += 1
        candidate = f"{seed}_{i}"
    taken.add(candidate)
    return candidate


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a value (tensor) everywhere in the graph, subgraphs included.

    If ``new`` is already the name of another value, that one is first moved out of the way
    (a graph input cannot be: that is a name clash the caller must report).
    """
    if old == new:
        return
    taken = _all_names(graph)
    if new in taken:
        if new in {v.name for v in graph.input}:
            raise ConversionError(f"cannot name an ONNX value {new!r}: an input has that name")
        _rename_value(graph, new, _fresh_name(taken, f"{new}_inner"))
    for g in (graph, *_subgraphs(graph)):
        for seq in (g.input, g.output, g.value_info, g.initializer):
            for item in seq:
                if item.name == old:
                    item.name = new
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new


def _pack_numeric_inputs(model: onnx.ModelProto, features: tuple[Feature, ...]) -> None:
    """Replace the per-column inputs of a converted model by the packed ``features`` input.

    ``model.graph.input`` holds one input per feature, in feature order (skl2onnx keeps the order
    of ``initial_types``, even for columns the model does not use, but may sanitise names). Each
    numeric one becomes the output of ``Gather(features, [column], axis=1)`` (a ``[N, 1]``
    slice), followed by a ``Cast`` for an integer input; categorical inputs are renamed to their
    column names.
    """
    onnx_lib = require_module("onnx", "conversion")
    from onnx import helper, numpy_helper

    graph = model.graph
    per_column = list(graph.input)
    if len(per_column) != len(features):
        raise ConversionError(
            f"skl2onnx made {len(per_column)} inputs for {len(features)} columns; cannot pack them"
        )
    # Move every per-column input to an internal name first, so that a column called like one of
    # the final inputs ("features", another column's sanitised name) cannot clash.
    taken = _all_names(graph)
    internal: list[str] = []
    for value in per_column:
        name = _fresh_name(taken, f"ew_col_{len(internal)}")
        _rename_value(graph, value.name, name)
        internal.append(name)
    if FEATURES_INPUT in _all_names(graph):
        _rename_value(graph, FEATURES_INPUT, _fresh_name(taken, f"{FEATURES_INPUT}_inner"))
    taken = _all_names(graph)

    new_nodes = []
    initializers = []
    categorical_inputs = []
    n_numeric = 0
    for feature, value, name in zip(features, list(graph.input), internal, strict=True):
        elem_type = value.type.tensor_type.elem_type
        if feature.kind == "categorical":
            _rename_value(graph, name, feature.input)
            categorical_inputs.append(
                helper.make_tensor_value_info(feature.input, onnx_lib.TensorProto.STRING, [None, 1])
            )
            continue
        n_numeric += 1
        index = _fresh_name(taken, f"ew_index_{feature.column}")
        initializers.append(numpy_helper.from_array(np.array([feature.column], np.int64), index))
        gathered = (
            name if elem_type == onnx_lib.TensorProto.FLOAT else _fresh_name(taken, name + "_f")
        )
        new_nodes.append(
            helper.make_node(
                "Gather",
                [FEATURES_INPUT, index],
                [gathered],
                axis=1,
                name=_fresh_name(taken, f"ew_gather_{feature.column}"),
            )
        )
        if gathered != name:
            new_nodes.append(
                helper.make_node(
                    "Cast",
                    [gathered],
                    [name],
                    to=elem_type,
                    name=_fresh_name(taken, f"ew_cast_{feature.column}"),
                )
            )
    inputs = []
    if n_numeric:
        inputs.append(
            helper.make_tensor_value_info(
                FEATURES_INPUT, onnx_lib.TensorProto.FLOAT, [None, n_numeric]
            )
        )
    inputs.extend(categorical_inputs)
    nodes = [*new_nodes, *graph.node]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)


def _skl2onnx_types(frame: pd.DataFrame, features: tuple[Feature, ...], packed: bool) -> list[Any]:
    from skl2onnx.common.data_types import (
        FloatTensorType,
        Int64TensorType,
        StringTensorType,
    )

    pd = require_pandas()
    if packed:
        return [(FEATURES_INPUT, FloatTensorType([None, len(features)]))]
    types: list[Any] = []
    for feature in features:
        if feature.kind == "categorical":
            types.append((feature.name, StringTensorType([None, 1])))
            continue
        dtype = frame[feature.name].dtype
        integer = pd.api.types.is_integer_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
        types.append((feature.name, (Int64TensorType if integer else FloatTensorType)([None, 1])))
    return types


def _single_input(model: Any, features: tuple[Feature, ...]) -> bool:
    """Whether skl2onnx can take ``features`` as its one input: numbers only, and no
    ColumnTransformer selecting columns by name."""
    all_numeric = all(f.kind == "numeric" for f in features)
    return all_numeric and not (_has_column_transformer(model) and _fit_names(model) is not None)


def _skl2onnx_error(model: Any, exc: BaseException) -> ConversionError:
    text = str(exc)
    if (
        type(exc).__name__ == "MissingShapeCalculator"
        or "Unable to find a shape calculator" in text
    ):
        start = text.find("<class '")
        culprit = text[start + 8 : text.find("'", start + 8)] if start >= 0 else "a step"
        return ConversionError(
            f"model: skl2onnx has no converter for {culprit} (a custom or unsupported estimator "
            "in the model); register one with skl2onnx.update_registered_converter"
        )
    return ConversionError(
        f"model: skl2onnx cannot convert the {type(model).__name__}: "
        f"{type(exc).__name__}: {_one_line(exc)}"
    )


def to_onnx(
    model: Any,
    frame: pd.DataFrame,
    features: tuple[Feature, ...],
    *,
    opset: int | Mapping[str, int] | None = None,
) -> onnx.ModelProto:
    """Convert a fitted model to ONNX with the package's inputs and output names.

    ``frame`` is the sample in the model's column order and ``features`` its
    :func:`infer_features`. Raises :class:`ConversionError` if skl2onnx cannot convert it or the
    result is not a valid model.
    """
    onnx_lib = require_module("onnx", "conversion")
    skl2onnx = require_module("skl2onnx", "conversion", extra="convert")
    target = _target_opsets(opset)
    task = _task_of(model)
    packed = _single_input(model, features)
    initial_types = _skl2onnx_types(frame, features, packed)
    options: dict[int, dict[str, Any]] | None = (
        {id(model): {"zipmap": False}} if task == "classification" else None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                onx = skl2onnx.convert_sklearn(
                    model, initial_types=initial_types, target_opset=target, options=options
                )
            except NameError as exc:  # a classifier whose converter has no zipmap option
                if options is None or "zipmap" not in str(exc):
                    raise
                onx = skl2onnx.convert_sklearn(
                    model, initial_types=initial_types, target_opset=target
                )
        except MemoryError:
            raise
        except Exception as exc:
            raise _skl2onnx_error(model, exc) from None

    graph = onx.graph
    if not packed:
        _pack_numeric_inputs(onx, features)
    elif [v.name for v in graph.input] != [FEATURES_INPUT]:
        raise ConversionError(
            f"skl2onnx made inputs {[v.name for v in graph.input]} instead of {FEATURES_INPUT!r}"
        )
    for value in graph.output:
        if value.type.WhichOneof("value") != "tensor_type":
            raise ConversionError(
                f"model output {value.name!r} is not a tensor (a ZipMap or sequence); "
                "cannot serve it"
            )
    outputs = [v.name for v in graph.output]
    renames: list[str] = []
    if task == "classification":
        if len(outputs) < 2:
            raise ConversionError(
                f"classifier converted with outputs {outputs}; expected a label and probabilities"
            )
        second = PROBABILITIES_OUTPUT if hasattr(model, "predict_proba") else SCORES_OUTPUT
        renames = [LABEL_OUTPUT, second]
    elif task == "regression":
        renames = [PREDICTIONS_OUTPUT]
    input_names = {v.name for v in graph.input}
    for old, new in zip(outputs, renames, strict=False):
        if new in input_names:
            raise InvalidInput(
                f"sample column {new!r}: clashes with the model output of that name; rename it"
            )
        _rename_value(graph, old, new)
    graph.name = "edgewise"
    try:
        onnx_lib.checker.check_model(onx, full_check=True)
    except Exception as exc:
        raise ConversionError(f"the converted model is not valid ONNX: {_one_line(exc)}") from None
    result: onnx.ModelProto = onx
    return result


# --------------------------------------------------------------------------------------------
# parity


def _session(model_bytes: bytes) -> Any:
    ort = require_module("onnxruntime", "conversion")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures surface as exceptions
    try:
        return ort.InferenceSession(
            model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ConversionError(
            f"onnxruntime cannot load the converted model: {_one_line(exc)}"
        ) from None


def _class_names(model: Any) -> tuple[str, ...]:
    """A classifier's classes as text, in the order of its output columns (none otherwise)."""
    classes = getattr(model, "classes_", None)
    return () if classes is None else tuple(str(c) for c in np.asarray(classes).reshape(-1))


def _takes_outputs(builder: ProfileBuilder) -> bool:
    """Whether a profile builder accepts ``outputs=`` (the model's outputs on the reference
    rows, for prediction drift); a builder written before it is called without them."""
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False
    return "outputs" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def _run(session: Any, features: tuple[Feature, ...], frame: pd.DataFrame, role: str) -> Any:
    try:
        inputs = frame_to_inputs(features, frame)
    except InvalidInput as exc:
        raise InvalidInput(f"{role}: {exc.message}") from None
    try:
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, onnxruntime_inputs(inputs)), strict=True))
    except Exception as exc:
        raise ConversionError(
            f"onnxruntime failed on the {role}: {type(exc).__name__}: {_one_line(exc)}"
        ) from None


def _call(model: Any, method: str, data: Any, role: str) -> np.ndarray[Any, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(getattr(model, method)(data))
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidInput(
            f"{role}: the original model's {method}() fails on it: "
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from None


def _compare_numeric(
    output: str,
    got: np.ndarray[Any, Any],
    expected: np.ndarray[Any, Any],
    atol: float,
    rtol: float,
    *,
    relative: bool = True,
) -> tuple[dict[str, Any], str | None]:
    """Largest absolute difference; a failure message when an element is off by more than
    ``atol + rtol * |expected|`` (NaN matches only NaN). With ``relative`` False (probabilities,
    bounded in [0, 1]) ``rtol`` is not applied and no relative figure is recorded."""
    if not relative:
        rtol = 0.0
    g = np.asarray(got, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if g.shape != e.shape:
        if g.size != e.size:
            return {}, (
                f"output {output!r} has shape {list(g.shape)}, the original model {list(e.shape)}"
            )
        g = g.reshape(e.shape)
    both_nan = np.isnan(g) & np.isnan(e)
    with np.errstate(invalid="ignore"):
        diff = np.abs(g - e)
    diff[both_nan] = 0.0
    diff[np.isnan(diff)] = np.inf
    allowed = atol + rtol * np.abs(np.nan_to_num(e, nan=0.0))
    bad = diff > allowed
    max_abs = float(diff.max()) if diff.size else 0.0
    record: dict[str, Any] = {"max_abs_diff": max_abs}
    if relative:
        scale = np.abs(e)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), 0.0)
        record["max_rel_diff"] = float(rel.max()) if rel.size else 0.0
    record["elements"] = int(diff.size)
    if not bad.any():
        return record, None
    worst = np.unravel_index(int(np.argmax(np.where(bad, diff, -1.0))), diff.shape)
    return record, (
        f"output {output!r} differs from the original model by up to {max_abs:.3g} "
        f"(row {int(worst[0])}; allowed: atol {atol:g}"
        + (f" + rtol {rtol:g}·|value|)" if rtol else ")")
    )


def _labels_equal(got: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]) -> Any:
    if got.dtype.kind in "biuf" and expected.dtype.kind in "biuf":
        return got.astype(np.float64) == expected.astype(np.float64)

    def text(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.array(
            [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values],
            dtype=object,
        )

    return text(got) == text(expected)


def _compare_labels(
    got: np.ndarray[Any, Any],
    expected: np.ndarray[Any, Any],
    probabilities: np.ndarray[Any, Any] | None,
    atol: float,
) -> tuple[dict[str, Any], str | None]:
    g = np.asarray(got).reshape(-1)
    e = np.asarray(expected).reshape(-1)
    if g.size != e.size:
        return {}, f"output {LABEL_OUTPUT!r} has {g.size} labels, predict() gave {e.size}"
    mismatch = ~np.asarray(_labels_equal(g, e), dtype=bool)
    tied = np.zeros_like(mismatch)
    if probabilities is not None and mismatch.any():
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim == 2 and p.shape[0] == g.size and p.shape[1] >= 2:
            top = np.sort(p, axis=1)[:, -2:]
            tied = mismatch & ((top[:, 1] - top[:, 0]) <= atol)
    untied = mismatch & ~tied
    record = {
        "rows": int(g.size),
        "mismatches": int(mismatch.sum()),
        "tied_mismatches": int(tied.sum()),
    }
    if not untied.any():
        return record, None
    row = int(np.argmax(untied))
    return record, (
        f"output {LABEL_OUTPUT!r} disagrees with predict() on {int(untied.sum())} of {g.size} "
        f"row(s) where the probabilities do not tie (first: row {row}, "
        f"{_display(g[row])} instead of {_display(e[row])})"
    )


def _display(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return repr(value.item() if isinstance(value, np.generic) else value)


def _parity(
    model: Any,
    task: Task,
    session: Any,
    features: tuple[Feature, ...],
    frame: pd.DataFrame,
    positional: bool,
    *,
    role: str,
    atol: float,
    rtol: float,
) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """Compare the ONNX model with the original on a table; raise ConversionError above the
    tolerance. Returns the figures and the ONNX outputs."""
    data = _model_input(frame, positional)
    expected: dict[str, np.ndarray[Any, Any]] = {}
    # The original first: a table it cannot score is the table's fault, not the conversion's.
    if task == "classification":
        if hasattr(model, "predict_proba"):
            expected[PROBABILITIES_OUTPUT] = _call(model, "predict_proba", data, role)
        expected[LABEL_OUTPUT] = _call(model, "predict", data, role)
    elif task == "regression":
        expected[PREDICTIONS_OUTPUT] = _call(model, "predict", data, role)
    else:
        method = "predict" if hasattr(model, "predict") else "transform"
        if hasattr(model, method):
            expected[method] = _call(model, method, data, role)
    results = _run(session, features, frame, role)
    outputs: dict[str, Any] = {}
    failures: list[str] = []

    def check(name: str, record: dict[str, Any], failure: str | None) -> None:
        outputs[name] = record
        if failure:
            failures.append(failure)

    if task == "classification":
        probabilities = expected.get(PROBABILITIES_OUTPUT)
        if probabilities is not None and PROBABILITIES_OUTPUT in results:
            check(
                PROBABILITIES_OUTPUT,
                *_compare_numeric(
                    PROBABILITIES_OUTPUT,
                    results[PROBABILITIES_OUTPUT],
                    probabilities,
                    atol,
                    rtol,
                    relative=False,
                ),
            )
        check(
            LABEL_OUTPUT,
            *_compare_labels(results[LABEL_OUTPUT], expected[LABEL_OUTPUT], probabilities, atol),
        )
    elif task == "regression":
        check(
            PREDICTIONS_OUTPUT,
            *_compare_numeric(
                PREDICTIONS_OUTPUT, results[PREDICTIONS_OUTPUT], expected[PREDICTIONS_OUTPUT],
                atol, rtol,
            ),
        )  # fmt: skip
    else:
        first = next(iter(results))
        for method, values in expected.items():
            got = np.asarray(results[first])
            if got.dtype.kind in "biuf" and values.dtype.kind in "biuf":
                record, failure = _compare_numeric(first, got, values, atol, rtol)
            else:
                record, failure = _compare_labels(got, values, None, atol)
            check(first, {**record, "against": f"{method}()"}, failure)
    if failures:
        raise ConversionError(f"parity check failed on the {role}: " + "; ".join(failures))
    return {"rows": len(frame), "outputs": outputs}, results


def _max_abs_diffs(parity: Mapping[str, Any]) -> dict[str, float]:
    """``{output: largest absolute difference}`` over the sample and the held-out rows, for the
    outputs compared numerically (the one-line summary the CLI prints)."""
    summary: dict[str, float] = {}
    for role in ("sample", "held_out"):
        for output, figures in parity.get(role, {}).get("outputs", {}).items():
            if "max_abs_diff" in figures:
                summary[output] = max(summary.get(output, 0.0), float(figures["max_abs_diff"]))
    return summary


def _output_specs(session: Any, results: Mapping[str, np.ndarray[Any, Any]]) -> list[TensorSpec]:
    specs = []
    for output in session.get_outputs():
        value = np.asarray(results[output.name])
        try:
            datatype = datatype_of(value.dtype)
        except ValueError:
            raise ConversionError(
                f"model output {output.name!r} has dtype {value.dtype}, which the V2 protocol "
                "cannot carry"
            ) from None
        specs.append(TensorSpec(name=output.name, datatype=datatype, shape=(-1, *value.shape[1:])))
    return specs


# --------------------------------------------------------------------------------------------
# the package


def _package_files(folder: Path) -> list[FileEntry]:
    others = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (MANIFEST_FILE, MODEL_FILE)
    )
    return [file_entry(folder, MODEL_FILE), *(file_entry(folder, rel) for rel in others)]


def _published_version(model_dir: Path, chosen: int, manifest: Manifest) -> int:
    """The version the package was published under: ``chosen`` unless a concurrent writer took
    it first, in which case :func:`staging_dir` moved on to the next free one."""
    wanted = json.loads(json.dumps(manifest.to_json()))
    for candidate in (chosen, *reversed(list_versions(model_dir))):
        try:
            if read_manifest(model_dir / str(candidate)).to_json() == wanted:
                return candidate
        except EdgewiseError:
            continue
    return chosen  # pragma: no cover - the package was just published


def _remove_if_empty(folders: Iterable[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def convert(
    model: Any,
    sample: pd.DataFrame | np.ndarray[Any, Any],
    *,
    name: str,
    repo: Path | str,
    version: int | None = None,
    opset: int | Mapping[str, int] | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    held_out: pd.DataFrame | np.ndarray[Any, Any] | None = None,
    profile_builder: ProfileBuilder | None = None,
    source: Mapping[str, Any] | None = None,
    reference_profile: bool = True,
    labels: Any = None,
) -> ConvertResult:
    """Convert a fitted scikit-learn model and publish it as ``repo/name/version``.

    ``sample`` (a DataFrame with the columns the model was fit on, or a 2-D array in that column
    order) gives the input schema and the parity data; ``held_out`` is checked as well when
    given. ``version`` None takes the next free integer. ``opset`` is the target ``ai.onnx``
    opset (or a ``{domain: version}`` mapping); the model records the opsets it actually uses.
    A reference profile of the sample (``profile.json``, see
    :mod:`edgewise.runtime.package.reference_profile`) is written unless ``reference_profile`` is
    False; ``profile_builder`` replaces the standard one. ``source`` adds entries to the manifest's
    ``source`` (e.g. the model file and its sha256). ``labels`` (a classifier's true labels of the
    held-out rows, else of the sample) calibrate its probabilities for performance estimation
    without labels (``calibration.json`` beside the profile, see
    :mod:`edgewise.runtime.package.performance_estimation`).

    Raises :class:`ConversionError` when the model cannot be converted or fails the parity check
    and :class:`InvalidInput` for a bad sample or argument; nothing is written then.
    """
    validate_model_name(name)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise InvalidInput(f"version: expected a positive integer, got {version!r}")
    if version is not None and version < 1:
        raise InvalidInput(f"version: expected a positive integer, got {version}")
    for label, value in (("atol", atol), ("rtol", rtol)):
        if not (isinstance(value, int | float) and np.isfinite(value) and value >= 0):
            raise InvalidInput(f"{label}: expected a non-negative number, got {value!r}")
    repo = Path(repo)
    model_dir = repo / name
    if version is not None and (model_dir / str(version)).exists():
        raise InvalidInput(f"version: {model_dir / str(version)} already exists")
    target = _target_opsets(opset)
    require_converter()
    _check_model(model)

    frame, positional = _prepare_frame(model, sample, "sample")
    features = infer_features(frame)
    held_frame = None
    if held_out is not None:
        held_frame = _prepare_frame(model, held_out, "held_out")[0]
        if positional:  # no names to match: the held-out columns are the sample's, in order
            if held_frame.shape[1] != frame.shape[1]:
                raise InvalidInput(
                    f"held_out: {held_frame.shape[1]} column(s), the sample has {frame.shape[1]}"
                )
            held_frame = held_frame.set_axis(list(frame.columns), axis=1)
    task = _task_of(model)

    onx = to_onnx(model, frame, features, opset=target)
    model_bytes: bytes = onx.SerializeToString()
    session = _session(model_bytes)
    expected_inputs = [(s.name, s.shape) for s in input_specs(features)]
    actual_inputs = [(i.name, i.type) for i in session.get_inputs()]
    if [n for n, _ in expected_inputs] != [n for n, _ in actual_inputs]:
        raise ConversionError(  # pragma: no cover - to_onnx builds exactly these inputs
            f"converted model inputs {actual_inputs} differ from the schema {expected_inputs}"
        )

    sample_parity, results = _parity(
        model, task, session, features, frame, positional, role="sample", atol=atol, rtol=rtol
    )
    parity: dict[str, Any] = {
        "passed": True,
        "atol": float(atol),
        "rtol": float(rtol),
        "sample": sample_parity,
    }
    # The model's outputs on rows it was not fit on (the held-out rows, when given) are the
    # reference of prediction drift: on its training rows a model is more confident than on
    # any new row.
    reference_outputs = ReferenceOutputs(
        results, task, _class_names(model), "sample"
    )  # fmt: skip
    if held_frame is not None:
        parity["held_out"], held_results = _parity(
            model, task, session, features, held_frame, positional,
            role="held_out", atol=atol, rtol=rtol,
        )  # fmt: skip
        reference_outputs = ReferenceOutputs(held_results, task, _class_names(model), "held_out")
    parity["max_abs_diff"] = _max_abs_diffs(parity)
    outputs = _output_specs(session, results)
    calibration = None
    if labels is not None:
        if profile_builder is None and not reference_profile:
            raise InvalidInput("labels: the calibration is kept with the reference profile")
        labelled, role = (frame, "sample") if held_frame is None else (held_frame, "held_out")
        scored = _run(session, features, labelled, role) if role == "held_out" else results
        calibration = fit_for_package(
            task, getattr(model, "classes_", None), scored.get(PROBABILITIES_OUTPUT), labels, role
        )

    opset_imports = {(o.domain or "ai.onnx"): int(o.version) for o in onx.opset_import}
    conversion = {
        "converter": f"skl2onnx {_library_versions()['skl2onnx']}",
        "target_opset": {(k or "ai.onnx"): v for k, v in target.items()},
        "opset_imports": opset_imports,
        "ir_version": int(onx.ir_version),
        "input_packing": (
            "none: skl2onnx's single float input is features"
            if _single_input(model, features)
            else "per-column inputs, numeric ones gathered from features"
        ),
    }
    manifest_source: dict[str, Any] = {**_source_summary(model), "conversion": conversion}
    manifest_source["sample"] = {"rows": len(frame), "columns": int(frame.shape[1])}
    if held_frame is not None:
        manifest_source["held_out"] = {"rows": len(held_frame)}
    if source:
        for key, value in source.items():
            existing = manifest_source.get(key)
            if isinstance(existing, dict) and isinstance(value, Mapping):
                manifest_source[key] = {**existing, **value}
            else:
                manifest_source[key] = value

    created = [p for p in (model_dir, repo) if not p.exists()]
    try:
        with staging_dir(repo, name, version) as (folder, chosen):
            (folder / MODEL_FILE).write_bytes(model_bytes)
            profile = None
            if profile_builder is None and reference_profile:
                profile_builder = default_profile_builder()
            if profile_builder is not None:
                builder: Any = profile_builder  # outputs= is optional beyond the Protocol
                entry = (
                    builder(folder, frame, features, outputs=reference_outputs)
                    if _takes_outputs(profile_builder)
                    else builder(folder, frame, features)
                )
                profile = None if entry is None else dict(entry)
            if calibration is not None:
                if profile is None:
                    raise InvalidInput("labels: the profile builder wrote no profile to keep")
                profile["calibration"] = write_calibration(folder, calibration)
            manifest = Manifest(
                name=name,
                task=task,
                inputs=input_specs(features),
                outputs=tuple(outputs),
                features=features,
                files=tuple(_package_files(folder)),
                opset=opset_imports.get("ai.onnx", target[""]),
                parity=parity,
                libraries=_library_versions(),
                source=manifest_source,
                created_at=_utc_now(),
                profile=profile,
            )
            write_manifest(folder, manifest)
            # Golden requests: a few sample rows and the outputs this model gave for them, which
            # the sync agent replays before it switches a node to this version.
            manifest = add_golden(folder, golden_inputs_from_sample(manifest, frame))
    except BaseException:
        _remove_if_empty(created)
        raise
    published = chosen if version is not None else _published_version(model_dir, chosen, manifest)
    return ConvertResult(
        name=name, version=published, path=model_dir / str(published), manifest=manifest
    )


def convert_files(
    model_path: Path | str,
    sample_path: Path | str,
    *,
    name: str,
    repo: Path | str,
    version: int | None = None,
    opset: int | Mapping[str, int] | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    held_out_path: Path | str | None = None,
    profile_builder: ProfileBuilder | None = None,
    reference_profile: bool = True,
    labels_path: Path | str | None = None,
) -> ConvertResult:
    """:func:`convert` from files: a ``.joblib``/``.pkl`` model and a ``.csv``, ``.parquet`` or
    ``.npy`` sample (and held-out table). A ``.npy`` table's columns are taken in the order the
    model was fit on. The manifest records the model file's sha256. ``labels_path`` is a
    one-column table of the true labels of the held-out rows (else the sample's)."""
    validate_model_name(name)
    require_converter()  # before unpickling: a scikit-learn model cannot load without it
    model_path = Path(model_path)
    for path in (sample_path, held_out_path, labels_path):
        if path is not None:
            table_format(path)  # fail on a bad file name before loading the model
    model = load_model(model_path)
    sample = _load_for(model, sample_path)
    held_out = None if held_out_path is None else _load_for(model, held_out_path)
    labels = None if labels_path is None else _load_labels(labels_path)
    source: dict[str, Any] = {
        "model_file": {
            "path": str(model_path),
            "sha256": sha256_file(model_path),
            "size": model_path.stat().st_size,
        },
    }
    source["sample"] = {"file": str(sample_path), "sha256": sha256_file(Path(sample_path))}
    if held_out_path is not None:
        source["held_out"] = {
            "file": str(held_out_path),
            "sha256": sha256_file(Path(held_out_path)),
        }
    if labels_path is not None:
        source["labels"] = {"file": str(labels_path), "sha256": sha256_file(Path(labels_path))}
    return convert(
        model,
        sample,
        name=name,
        repo=repo,
        version=version,
        opset=opset,
        atol=atol,
        rtol=rtol,
        held_out=held_out,
        profile_builder=profile_builder,
        source=source,
        reference_profile=reference_profile,
        labels=labels,
    )


def _load_labels(path: Path | str) -> np.ndarray[Any, Any]:
    table = load_table(path)
    if table.shape[1] != 1:
        raise InvalidInput(f"labels: {path} has {table.shape[1]} columns; expected one")
    return np.asarray(table.iloc[:, 0].to_numpy())


def _load_for(model: Any, path: Path | str) -> Any:
    frame = load_table(path)
    names = _fit_names(model)
    if table_format(path) == "npy" and names is not None and frame.shape[1] == len(names):
        frame.columns = names
    return frame
