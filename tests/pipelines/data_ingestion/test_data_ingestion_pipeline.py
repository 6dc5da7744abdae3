import json

import pandas as pd
import pytest
from kedro.validation.exceptions import ParameterValidationError

from prefgen_kedro.data.tables import IMAGES_COLUMNS, INTERACTIONS_COLUMNS, USERS_COLUMNS


def test_data_ingestion_runs_on_smoke(run_smoke, smoke_data):
    run_smoke("data_ingestion")

    data = smoke_data
    images = pd.read_parquet(data / "02_intermediate" / "images.parquet")
    interactions = pd.read_parquet(data / "02_intermediate" / "interactions.parquet")
    users = pd.read_parquet(data / "02_intermediate" / "users.parquet")
    report = json.loads((data / "08_reporting" / "ingestion_report.json").read_text())

    assert set(IMAGES_COLUMNS) <= set(images.columns)
    assert set(INTERACTIONS_COLUMNS) <= set(interactions.columns)
    assert set(USERS_COLUMNS) <= set(users.columns)
    assert report["images"] == len(images) == len(interactions) == 12 * 8
    assert set(users["split"]) == {"train", "val", "test"}
    # Every row's path points at a picture the pipeline wrote.
    assert all((data / path).is_file() for path in images["path"])


@pytest.mark.parametrize(
    ("line", "bad_line", "key"),
    [
        ("    n_users: 12\n", "    n_users: 12\n    n_userz: 3\n", "n_userz"),
        ("    n_users: 12\n", "    n_users: many\n", "n_users"),
    ],
)
def test_bad_parameters_stop_the_run_naming_the_key(run_smoke, smoke_project, line, bad_line, key):
    params_file = smoke_project / "conf" / "smoke" / "parameters_data_ingestion.yml"
    original = params_file.read_text()
    assert line in original
    params_file.write_text(original.replace(line, bad_line))
    try:
        with pytest.raises(ParameterValidationError, match=key):
            run_smoke("data_ingestion")
    finally:
        params_file.write_text(original)
