"""The checkpoints that ship in data/06_models/foundation are the ones the manifest describes."""

import json
from pathlib import Path

import pytest

from prefgen_kedro.foundation import require_current_world, weight_hashes

FOUNDATION = Path(__file__).resolve().parents[1] / "data" / "06_models" / "foundation"
MANIFEST = FOUNDATION / "manifest.json"

pytestmark = pytest.mark.skipif(not MANIFEST.exists(), reason="no shipped foundation yet")


def shipped_entries() -> list[str]:
    return sorted(json.loads(MANIFEST.read_text())) if MANIFEST.exists() else []


@pytest.mark.parametrize("name", shipped_entries())
def test_shipped_weights_match_the_manifest_and_the_world(name):
    manifest = json.loads(MANIFEST.read_text())
    require_current_world(manifest, name)
    assert manifest[name]["sha256"] == weight_hashes(FOUNDATION / name)
