"""One process of a launched training run: ``torchrun`` starts one per GPU with the job that
``training.launch_training`` pickled; each trains its share, and the main process writes
what the launching process reads back (``resumed_from``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import cloudpickle
import torch.distributed as dist

from prefgen_kedro.training import LAUNCH_RESULT_FILE, register_output_capturing, train


def main(job_path: str) -> None:
    """Train the pickled ``train`` call at ``job_path`` as this rank of the group."""
    job = Path(job_path)
    arguments = cloudpickle.loads(job.read_bytes())
    register_output_capturing(arguments["model"])
    result = train(**arguments)
    if int(os.environ.get("RANK", "0")) == 0:
        (job.parent / LAUNCH_RESULT_FILE).write_text(
            json.dumps({"resumed_from": result.resumed_from, "steps": result.steps})
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
