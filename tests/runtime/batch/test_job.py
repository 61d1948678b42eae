"""Batch jobs end to end on real files: scores, id columns, formats, schema errors, output folder
rules, the summary and the online/offline parity with the gRPC server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edgewise.runtime.errors import InvalidInput, ModelNotFound, PackageError
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.schema import frame_to_inputs
from tests import models
from tests.runtime.batch.helpers import (
    ID,
    Inputs,
    assert_scores_equal,
    assert_tables_equal,
    batch,
    edgewise,
    expected_scores,
    output_arrays,
    read_output,
    report_without_time,
)
from tests.servers import running_server


def test_parquet_job_scores_every_row_once_and_passes_ids_through(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary = batch(model_repo, "logreg", inputs.cancer_parquet, out, chunk_rows=1000)
    n = len(inputs.cancer)
    manifest = read_manifest(model_repo / "logreg" / "1")
    assert summary.rows == summary.rows_this_run == n
    assert summary.parts == -(-n // 1000)
    assert (summary.model, summary.version, summary.sha256) == ("logreg", 1, manifest.model_sha256)
    assert summary.rows_per_second > 0 and summary.seconds > 0
    assert not summary.resumed
    on_disk = json.loads((out / "_summary.json").read_text())
    assert on_disk["rows"] == n and on_disk["sha256"] == manifest.model_sha256
    assert (out / "_SUCCESS").exists()

    table = read_output(out)
    assert table.column_names == [ID, "label", "probabilities"]
    assert table.schema.field("probabilities").type == pa.list_(pa.float32(), 2)
    identity = json.loads(table.schema.metadata[b"edgewise.batch"])
    assert identity == {"model": "logreg", "version": 1, "sha256": manifest.model_sha256}
    np.testing.assert_array_equal(table.column(ID).to_numpy(), inputs.cancer[ID].to_numpy())
    expected = expected_scores(model_repo, "logreg", inputs.cancer, 1000)
    assert_scores_equal(output_arrays(table), expected)
    # The whole folder reads as one table with the usual readers (the job's files are skipped).
    assert len(pd.read_parquet(out)) == n


@pytest.mark.parametrize("source", ["cancer_csv", "cancer_npy"])
def test_csv_and_npy_inputs_give_the_parquet_output(
    model_repo: Path, inputs: Inputs, tmp_path: Path, source: str
) -> None:
    batch(model_repo, "logreg", inputs.cancer_parquet, tmp_path / "parquet", chunk_rows=2500)
    batch(model_repo, "logreg", getattr(inputs, source), tmp_path / "other", chunk_rows=2500)
    assert_tables_equal(read_output(tmp_path / "other"), read_output(tmp_path / "parquet"))
    assert report_without_time(tmp_path / "other") == report_without_time(tmp_path / "parquet")


def test_plain_npy_matrix_is_read_in_feature_order(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    features = inputs.cancer.drop(columns=[ID])
    path = tmp_path / "matrix.npy"
    np.save(path, features.to_numpy())
    batch(model_repo, "logreg", path, tmp_path / "out", id_columns=(), chunk_rows=3000)
    table = read_output(tmp_path / "out")
    assert table.column_names == ["label", "probabilities"]
    expected = expected_scores(model_repo, "logreg", features, 3000)
    assert_scores_equal(output_arrays(table), expected)


@pytest.mark.parametrize("source", ["mixed_parquet", "mixed_csv"])
def test_categorical_and_integer_columns_with_missing_values(
    model_repo: Path, inputs: Inputs, tmp_path: Path, source: str
) -> None:
    out = tmp_path / "out"
    batch(model_repo, "mixed", getattr(inputs, source), out, chunk_rows=777)
    table = read_output(out)
    expected = expected_scores(model_repo, "mixed", inputs.mixed, 777)
    assert_scores_equal(output_arrays(table), expected)
    report = json.loads((out / "_drift_report.json").read_text())
    color = next(f for f in report["features"] if f["name"] == "color_band")
    unseen = int((inputs.mixed["color_band"] == "unheard-of").sum())
    assert color["distribution"]["batch"][-1] == unseen
    level = next(f for f in report["features"] if f["name"] == "alcohol_level")
    assert level["statistics"]["missing"] == float(inputs.mixed["alcohol_level"].isna().sum())
    malic = next(f for f in report["features"] if f["name"] == "malic_acid")
    assert malic["statistics"]["missing"] == float(inputs.mixed["malic_acid"].isna().sum())


def test_regressor_output_is_a_plain_column(model_repo: Path, tmp_path: Path) -> None:
    _, frame, _ = models.train_regressor()
    path = tmp_path / "diabetes.parquet"
    frame.to_parquet(path, index=False)
    batch(model_repo, "regressor", path, tmp_path / "out", id_columns=("age",), chunk_rows=100)
    table = read_output(tmp_path / "out")
    assert table.schema.field("predictions").type == pa.float32()
    expected = expected_scores(model_repo, "regressor", frame, 100)
    assert_scores_equal(output_arrays(table), expected)


def test_folder_and_glob_inputs_are_read_in_sorted_order(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    (folder / "b").mkdir(parents=True)
    parts = [inputs.cancer.iloc[i * 4000 : (i + 1) * 4000] for i in range(3)]
    parts[0].to_parquet(folder / "a.parquet", index=False)
    parts[1].to_csv(folder / "b" / "x.csv", index=False)
    parts[2].to_parquet(folder / "c.parquet", index=False)
    (folder / "_SUCCESS").write_text("")
    (folder / ".hidden.parquet").write_text("not parquet")
    (folder / "notes.txt").write_text("ignored")
    expected_ids = pd.concat(parts)[ID].to_numpy()

    summary = batch(model_repo, "logreg", folder, tmp_path / "out-folder", chunk_rows=1500)
    assert summary.inputs == 3
    np.testing.assert_array_equal(read_output(tmp_path / "out-folder")[ID].to_numpy(), expected_ids)

    summary = batch(model_repo, "logreg", f"{folder}/*.parquet", tmp_path / "out-glob")
    assert summary.inputs == 2
    assert summary.rows == 8000 - 4000 + len(parts[2])


def test_default_version_is_the_one_the_server_serves(
    fresh_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    models.convert_model("forest", fresh_repo)  # version 2
    wine = inputs.mixed.drop(columns=["alcohol_level", "color_band"])
    path = tmp_path / "wine.parquet"
    wine.to_parquet(path, index=False)
    assert batch(fresh_repo, "forest", path, tmp_path / "latest").version == 2
    assert batch(fresh_repo, "forest:1", path, tmp_path / "pinned").version == 1
    (fresh_repo / "forest" / "config.json").write_text(json.dumps({"default_version": 1}))
    assert batch(fresh_repo, "forest", path, tmp_path / "default").version == 1


# ---- errors before anything is scored ----------------------------------------------------------


def _error(model_repo: Path, source: Path | str, out: Path, **kwargs: object) -> str:
    with pytest.raises(InvalidInput) as caught:
        batch(model_repo, kwargs.pop("model", "logreg"), source, out, **kwargs)  # type: ignore[arg-type]
    assert not list(out.glob("part-*")), "nothing may be scored before the schema check"
    return caught.value.message


def test_missing_and_mistyped_columns_are_named(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    broken = inputs.cancer.drop(columns=["mean radius"]).copy()
    broken["worst area"] = broken["worst area"].map(lambda v: f"{v:.1f} mm2")
    path = tmp_path / "broken.parquet"
    broken.to_parquet(path, index=False)
    message = _error(model_repo, path, tmp_path / "out")
    assert "missing feature column 'mean radius'" in message
    assert "column 'worst area' holds string, but the model's feature is numeric" in message
    assert str(path) in message and "\n" not in message

    csv = tmp_path / "broken.csv"
    broken.to_csv(csv, index=False)
    message = _error(model_repo, csv, tmp_path / "out-csv")
    assert "'mean radius'" in message and "'worst area'" in message

    message = _error(model_repo, inputs.cancer_parquet, tmp_path / "o", id_columns=("customer",))
    assert "missing id column 'customer'" in message


def test_a_later_file_with_a_bad_schema_stops_the_job_before_scoring(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    inputs.cancer.to_parquet(folder / "a.parquet", index=False)
    inputs.cancer.drop(columns=["worst symmetry"]).to_parquet(folder / "b.parquet", index=False)
    message = _error(model_repo, folder, tmp_path / "out")
    assert "b.parquet" in message and "'worst symmetry'" in message


def test_every_problem_of_every_file_is_reported_at_once_and_nothing_is_written(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    inputs.cancer.drop(columns=["mean radius"]).to_parquet(folder / "a.parquet", index=False)
    inputs.cancer.iloc[:50].to_parquet(folder / "b.parquet", index=False)  # a good one
    texty = inputs.cancer.iloc[:50].drop(columns=["worst symmetry"])
    texty["mean texture"] = "rough"
    texty.to_csv(folder / "c.csv", index=False)
    out = tmp_path / "out"
    message = _error(model_repo, folder, out)
    assert message.startswith("2 input files do not fit the model: "), message
    assert "a.parquet: missing feature column 'mean radius'" in message
    assert "c.csv: missing feature column 'worst symmetry'; column 'mean texture' holds" in message
    assert "b.parquet" not in message and "\n" not in message
    assert not out.exists(), "a refused job creates no output folder"


def test_every_unreadable_file_is_reported_at_once(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(b"not parquet")
    inputs.cancer.iloc[:50].to_parquet(folder / "b.parquet", index=False)
    (folder / "c.npy").write_bytes(b"not numpy")
    message = _error(model_repo, folder, tmp_path / "out")
    assert message.startswith("2 input files cannot be read: "), message
    assert "a.parquet: cannot read as Parquet" in message and "c.npy: cannot read" in message


def test_categorical_feature_given_floats_is_refused(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    frame = inputs.mixed.copy()
    frame["color_band"] = np.linspace(0, 1, len(frame))
    path = tmp_path / "wrong.parquet"
    frame.to_parquet(path, index=False)
    message = _error(model_repo, path, tmp_path / "out", model="mixed")
    assert "column 'color_band' holds double, but the model's feature is categorical" in message


def test_id_column_named_like_an_output_is_refused(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    frame = inputs.cancer.rename(columns={ID: "label"})
    path = tmp_path / "clash.parquet"
    frame.to_parquet(path, index=False)
    assert "'label'" in _error(model_repo, path, tmp_path / "out", id_columns=("label",))


def test_bad_value_in_a_later_csv_block_stops_the_job_with_the_value_named(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    frame = pd.concat([inputs.cancer] * 8, ignore_index=True).astype({"mean texture": object})
    frame.loc[len(frame) - 10, "mean texture"] = "n/a?"
    path = tmp_path / "late.csv"
    frame.to_csv(path, index=False)  # ~36 MB: the bad value is far past the first block
    out = tmp_path / "out"
    with pytest.raises(InvalidInput) as caught:
        batch(model_repo, "logreg", path, out, chunk_rows=20000)
    assert "late.csv" in caught.value.message and "n/a?" in caught.value.message
    # Whatever was finished before the error is journaled, and nothing else is left behind.
    journal = (
        (out / "_chunks.jsonl").read_text().splitlines() if (out / "_chunks.jsonl").exists() else []
    )
    parts = {json.loads(line)["chunk"] for line in journal}
    assert {int(p.name[11:17]) for p in out.glob("part-*")} == parts
    assert not list(out.glob(".tmp-*"))


def test_output_folder_rules(model_repo: Path, inputs: Inputs, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert "not empty" in _error(model_repo, inputs.cancer_parquet, taken)

    out = tmp_path / "out"
    batch(model_repo, "logreg", inputs.cancer_parquet, out)
    with pytest.raises(InvalidInput, match="holds a batch job already: pass --resume"):
        batch(model_repo, "logreg", inputs.cancer_parquet, out)

    inside = inputs.folder / "out-inside"
    with pytest.raises(InvalidInput, match="inside the input folder"):
        batch(model_repo, "logreg", inputs.folder, inside)
    assert not inside.exists()
    with pytest.raises(InvalidInput, match=r"no \.parquet, \.csv or \.npy file matches"):
        batch(model_repo, "logreg", f"{tmp_path}/nothing-*.parquet", tmp_path / "o2")
    with pytest.raises(ModelNotFound):
        batch(model_repo, "nope", inputs.cancer_parquet, tmp_path / "o3")


def test_resume_refuses_a_changed_job(model_repo: Path, inputs: Inputs, tmp_path: Path) -> None:
    source = tmp_path / "in.parquet"
    shutil.copy(inputs.cancer_parquet, source)
    out = tmp_path / "out"
    batch(model_repo, "logreg", source, out, chunk_rows=1000)
    again = batch(model_repo, "logreg", source, out, resume=True)
    assert again.already_complete and again.rows == len(inputs.cancer)
    with pytest.raises(InvalidInput, match="chunks have 1000 rows, not 2000"):
        batch(model_repo, "logreg", source, out, resume=True, chunk_rows=2000)
    with pytest.raises(InvalidInput, match="scores model 'logreg', not 'forest'"):
        batch(model_repo, "forest", source, out, resume=True)
    with pytest.raises(InvalidInput, match="version 1, not 2"):
        batch(model_repo, "logreg:2", source, out, resume=True)
    inputs.cancer.iloc[:100].to_parquet(source, index=False)
    with pytest.raises(InvalidInput, match="changed since the job started"):
        batch(model_repo, "logreg", source, out, resume=True)


def test_package_without_profile_is_scored_with_the_report_marked_unavailable(
    tmp_path: Path, inputs: Inputs
) -> None:
    repo = tmp_path / "repo"
    models.convert_model("logreg", repo, reference_profile=False)
    out = tmp_path / "out"
    summary = batch(repo, "logreg", inputs.cancer_parquet, out)
    assert summary.rows == len(inputs.cancer)
    assert summary.drift["available"] is False
    report = json.loads((out / "_drift_report.json").read_text())
    assert report["available"] is False and "no reference profile" in report["reason"]
    assert "Drift not computed" in (out / "_drift_report.html").read_text()


# ---- the command line ----------------------------------------------------------------------------


def test_cli_runs_a_job_and_prints_one_summary_line(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = edgewise(
        "batch", "--repo", str(model_repo), "--model", "logreg:1",
        "--input", str(inputs.cancer_csv), "--output", str(out), "--id-columns", ID,
        "--chunk-rows", "4000", "--progress", "log",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    assert f"scored {len(inputs.cancer):,} rows" in lines[0] and "no drift" in lines[0]
    assert "rows/s" in done.stderr and "ETA" in done.stderr  # the plain progress log lines
    again = edgewise(
        "batch", "--repo", str(model_repo), "--model", "logreg", "--input",
        str(inputs.cancer_csv), "--output", str(out), "--resume", "--json",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["already_complete"] is True


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("drop", "missing feature column 'mean radius'"),
        ("text", "column 'mean radius' holds string, but the model's feature is numeric"),
    ],
)
def test_cli_schema_error_is_one_line_and_exit_1(
    model_repo: Path, inputs: Inputs, tmp_path: Path, change: str, expected: str
) -> None:
    frame = inputs.cancer.iloc[:500].copy()
    if change == "drop":
        frame = frame.drop(columns=["mean radius"])
    else:
        frame["mean radius"] = "wide"
    path = tmp_path / "in.parquet"
    frame.to_parquet(path, index=False)
    done = edgewise(
        "batch", "--repo", str(model_repo), "--model", "logreg", "--input", str(path),
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    assert errors[0].startswith("edgewise batch: error:")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_cli_names_every_bad_file_on_one_line(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name, column in (("a", "mean radius"), ("b", "worst area")):
        inputs.cancer.iloc[:100].drop(columns=[column]).to_parquet(folder / f"{name}.parquet")
    done = edgewise(
        "batch", "--repo", str(model_repo), "--model", "logreg", "--input", str(folder),
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "a.parquet: missing feature column 'mean radius'" in line
    assert "b.parquet: missing feature column 'worst area'" in line
    assert not (tmp_path / "out").exists()


# ---- online/offline parity ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["logreg", "mixed"])
def test_batch_scores_equal_the_grpc_servers_answers(
    model_repo: Path, inputs: Inputs, tmp_path: Path, name: str
) -> None:
    frame = (inputs.cancer if name == "logreg" else inputs.mixed).iloc[:3000]
    source = tmp_path / "rows.parquet"
    frame.to_parquet(source, index=False)
    chunk_rows = 500
    batch(model_repo, name, source, tmp_path / "out", chunk_rows=chunk_rows)
    offline = output_arrays(read_output(tmp_path / "out"))
    manifest = read_manifest(model_repo / name / "1")
    with running_server(model_repo, tmp_path / "server") as server, server.client() as client:
        # The same rows in the same batches: identical to the bit.
        online: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(frame), chunk_rows):
            rows = frame.iloc[start : start + chunk_rows]
            answer = client.infer(name, frame_to_inputs(manifest, rows))
            assert answer.model_version == "1"
            for key, value in answer.outputs.items():
                online.setdefault(key, []).append(value)
        for key, parts in online.items():
            want = np.concatenate(parts)
            np.testing.assert_array_equal(offline[key].reshape(want.shape), want, err_msg=key)
        # Any other batching: the same labels, probabilities to float32 rounding.
        picked = [3, 17, 512, 999, 2047, 2999]
        answer = client.infer(name, frame_to_inputs(manifest, frame.iloc[picked]))
    np.testing.assert_array_equal(offline["label"][picked], answer.outputs["label"])
    np.testing.assert_allclose(
        offline["probabilities"][picked], answer.outputs["probabilities"], rtol=0, atol=1e-6
    )


def test_part_files_hold_the_rows_of_their_chunk(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    batch(model_repo, "logreg", inputs.cancer_parquet, out, chunk_rows=4096)
    parts = sorted(out.glob("part-*.parquet"))
    ids = inputs.cancer[ID].to_numpy()
    for index, part in enumerate(parts):
        assert part.name == f"part-00000-{index:06d}.parquet"
        got = pq.read_table(part).column(ID).to_numpy()
        np.testing.assert_array_equal(got, ids[index * 4096 : (index + 1) * 4096])


def test_a_package_that_fails_verification_leaves_no_job_behind(
    fresh_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    model_file = fresh_repo / "logreg" / "1" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:-1] + b"\0")
    out = tmp_path / "out"
    with pytest.raises(PackageError, match="sha256"):
        batch(fresh_repo, "logreg", inputs.cancer_parquet, out)
    assert not (out / "_job.json").exists()


def test_a_malformed_job_manifest_is_reported(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    batch(model_repo, "logreg", inputs.cancer_parquet, out)
    job = json.loads((out / "_job.json").read_text())
    del job["chunk_rows"]
    (out / "_job.json").write_text(json.dumps(job))
    with pytest.raises(InvalidInput, match="malformed job manifest"):
        batch(model_repo, "logreg", inputs.cancer_parquet, out, resume=True)
