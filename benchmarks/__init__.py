"""Throughput of the project's heavy steps, each as a ratio against a plain reference doing the
same work in the same run (so the ratio, not the machine, is the finding).

- ``adapter_step`` — a user-branch training step (the shipped base UNet with a ``UserAdapter``,
  through the project's trainer) vs. a bare diffusers UNet training step of the same size.
- ``fid`` — the evaluation's FID road (``inception_features`` + ``ReferenceStatistics``) vs.
  one ``torch_fidelity.calculate_metrics`` call on the same images.
- ``mllm_vqa_step`` — a VQA tuning step of the shipped MLLM through the project's trainer vs.
  ``model(**batch).loss.backward()`` + an optimizer step on the same collated batch.

``python -m benchmarks.run_all`` runs all three and writes ``benchmarks/RESULTS.md``; each
module also runs alone (``python -m benchmarks.fid``) and prints its table. ``--quick``: a few
steps each, to check that they run. The shipped models are loaded from
``data/06_models/foundation`` with ``from_pretrained``; settings copy the pipeline's parameters
(benchmarks read no YAML).
"""

from pathlib import Path

FOUNDATION = Path(__file__).resolve().parents[1] / "data" / "06_models" / "foundation"
