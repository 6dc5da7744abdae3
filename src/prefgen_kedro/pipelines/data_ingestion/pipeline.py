"""The ``data_ingestion`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import ingest


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                ingest,
                inputs="params:data_ingestion",
                outputs=["images", "interactions", "users", "raw_images", "ingestion_report"],
                name="ingest",
            )
        ],
        namespace="data_ingestion",
        # a group in kedro-viz; datasets keep their catalog names
        prefix_datasets_with_namespace=False,
    )
