"""Shared fixtures: a throwaway copy of the project to run pipelines on ``smoke`` (with
simulated users, and with real-user tables), and a Qwen2-VL processor for the gpu world's
MLLM family."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from kedro.config import OmegaConfigLoader
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPModel,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from prefgen_kedro.data.pickapic import SOURCE
from prefgen_kedro.data.tables import IMAGES_COLUMNS, INTERACTIONS_COLUMNS, USERS_COLUMNS
from prefgen_kedro.models.clip import build_conditioning_clip

# Runs in tests are not tracked (one test turns tracking on for its own runs).
os.environ["PREFGEN_TRACKING"] = "off"

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Where ``smoke`` writes everything, below a project (conf/smoke/globals.yml).
SMOKE_DATA = Path("data") / "smoke"


SHIPPED_FOUNDATION = Path("data") / "06_models" / "foundation"


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project's config and shipped models with a data folder that holds only
    a stand-in for each of ``base``'s outputs (``base_outputs``), so pipeline tests never
    touch the working tree's data and can tell whether ``smoke`` wrote over ``base``."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root)
    shutil.copy(PROJECT_ROOT / ".telemetry", root)
    (root / "src").mkdir()  # kedro wants the folder; the package itself is installed
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    (root / "data").mkdir()
    foundation = PROJECT_ROOT / SHIPPED_FOUNDATION
    if foundation.exists():
        shutil.copytree(foundation, root / SHIPPED_FOUNDATION)
    for path, content in base_outputs(root).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


@pytest.fixture(scope="session")
def base_stand_ins(smoke_project: Path) -> dict[Path, bytes]:
    """What ``smoke_project`` holds in place of ``base``'s outputs (path → bytes)."""
    return base_outputs(smoke_project)


def base_outputs(project: Path) -> dict[Path, bytes]:
    """A stand-in file (path → bytes) for every file or folder ``base`` writes in its own
    data root: each dataset of its catalog outside the shipped foundation (but factory
    patterns), and its trainer checkpoints and provenance records."""
    config = OmegaConfigLoader(str(project / "conf"), base_env="base", default_run_env="base")
    data_root = Path(config["globals"]["data_root"])
    written = {data_root / "06_models" / "checkpoints", data_root / "provenance"}
    for entry in config["catalog"].values():
        location = entry.get("filepath") or entry.get("path")
        if location and not Path(location).is_relative_to(SHIPPED_FOUNDATION):
            written.add(Path(location))
    return {
        # a folder's stand-in is a file inside it
        project / (path if path.suffix else path / "base.bin"): f"base: {path}".encode()
        for path in written
        if path.is_relative_to(data_root) and "{" not in str(path)  # no factory pattern
    }


@pytest.fixture(scope="session")
def smoke_data(smoke_project: Path) -> Path:
    """Where ``smoke`` runs of the project copy write (its ``data_root``)."""
    return smoke_project / SMOKE_DATA


def _run_pipelines(
    project: Path,
    pipeline_names: list[str] | None,
    runtime_params: dict | None,
    node_names: list[str] | None = None,
    env: str = "smoke",
) -> dict:
    bootstrap_project(project)
    with KedroSession.create(
        project_path=project, env=env, runtime_params=runtime_params
    ) as session:
        return session.run(pipeline_names=pipeline_names, node_names=node_names)


@pytest.fixture
def run_smoke(smoke_project: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict]:
    """Run named pipelines of the project copy on ``smoke``; returns the run's outputs."""

    def run(*pipeline_names: str, runtime_params: dict | None = None) -> dict:
        monkeypatch.chdir(smoke_project)
        return _run_pipelines(smoke_project, list(pipeline_names), runtime_params)

    return run


@pytest.fixture
def run_in(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Run named pipelines (or nodes of the default one) of a project copy, on ``smoke``
    unless ``env`` says otherwise; returns the copy's smoke data folder."""

    def run(
        project: Path,
        *pipeline_names: str,
        runtime_params: dict | None = None,
        node_names: list[str] | None = None,
        env: str = "smoke",
    ) -> Path:
        monkeypatch.chdir(project)
        _run_pipelines(project, list(pipeline_names) or None, runtime_params, node_names, env)
        return project / SMOKE_DATA

    return run


@pytest.fixture(scope="session")
def smoke_foundation(smoke_project: Path) -> Path:
    """The smoke-sized foundation models (made once per test session), which the smoke
    runs of later pipelines start from; returns their folder."""
    return _run_once(smoke_project, ["foundation"]) / "06_models" / "foundation"


def _run_once(project: Path, pipeline_names: list[str], runtime_params: dict | None = None) -> Path:
    here = Path.cwd()
    os.chdir(project)
    try:
        _run_pipelines(project, pipeline_names, runtime_params)
    finally:
        os.chdir(here)
    return project / SMOKE_DATA


@pytest.fixture(scope="session")
def smoke_tuned(smoke_foundation: Path, smoke_project: Path) -> Path:
    """``data_ingestion`` and ``vqa_tuning`` run once on ``smoke`` (later stages stand on
    them); returns the project copy's data folder."""
    return _run_once(smoke_project, ["data_ingestion", "vqa_tuning"])


@pytest.fixture(scope="session")
def smoke_aligned(smoke_tuned: Path, smoke_project: Path) -> Path:
    """``probing`` and ``alignment`` run once on ``smoke``, after ``smoke_tuned``."""
    return _run_once(smoke_project, ["probing", "alignment"])


@pytest.fixture(scope="session")
def smoke_diffused(smoke_aligned: Path, smoke_project: Path) -> Path:
    """``diffusion`` run once on ``smoke``, after ``smoke_aligned``."""
    return _run_once(smoke_project, ["diffusion"])


@pytest.fixture(scope="session")
def smoke_evaluated(smoke_diffused: Path, smoke_project: Path) -> Path:
    """``evaluation`` run once on ``smoke``, after ``smoke_diffused``."""
    return _run_once(smoke_project, ["evaluation"])


# What conf/gpu turns off for Pick-a-Pic users: the branch fed their (unknown) true taste.
REAL_USER_PARAMS = {
    # as gpu's: a real user's phrases are whole captions, read by the branch, not said
    "diffusion": {"variants": {"oracle_taste": None, "oracle_state": None}, "said_parts": []},
    "evaluation": {
        "methods": [
            "base",
            "viper_style",
            "ip_adapter",
            "mean_clip",
            "prefgen",
            "prefgen_no_mmd",
            "prefgen_no_core",
            "prefgen_no_sem",
            "prefgen_no_img",
        ],
        "references": [],
    },
}


@pytest.fixture(scope="session")
def smoke_real_users(
    smoke_aligned: Path, smoke_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``diffusion`` and ``evaluation`` run once on ``smoke`` in a copy of the project made
    after ``smoke_aligned``, whose users are made real: the tables rewritten as the Pick-a-Pic
    ingestion writes them (``as_real_users``), so no taste is known. Returns the copy's data
    folder."""
    project = tmp_path_factory.mktemp("real_users")
    # Fresh trainer checkpoints; the shipped foundation is not smoke's.
    shipped = smoke_project / "data" / "06_models" / "foundation"
    shutil.copytree(
        smoke_project,
        project,
        dirs_exist_ok=True,
        ignore=lambda folder, names: [
            name for name in names if name == "checkpoints" or Path(folder, name) == shipped
        ],
    )
    as_real_users(project / SMOKE_DATA)
    # Tables rewritten by hand come from nowhere the provenance records know: without the
    # records, each is its own origin (with them, the runs would refuse the mixed versions).
    shutil.rmtree(project / SMOKE_DATA / "provenance")
    return _run_once(project, ["diffusion", "evaluation"], REAL_USER_PARAMS)


@pytest.fixture
def smoke_copy(smoke_project: Path, tmp_path: Path) -> Callable[..., Path]:
    """Copies the session's smoke project as it is now (without the shipped foundation,
    which smoke never reads), leaving out the trainer checkpoint folders whose names match
    ``fresh`` (globs), so those trainings start afresh in the copy; returns the copy."""

    def copy(*fresh: str) -> Path:
        project = tmp_path / "project"
        shipped = smoke_project / SHIPPED_FOUNDATION
        shutil.copytree(
            smoke_project,
            project,
            ignore=lambda folder, names: [
                name
                for name in names
                if Path(folder, name) == shipped
                or (
                    Path(folder).name == "checkpoints"
                    and any(fnmatch.fnmatch(name, glob) for glob in fresh)
                )
            ],
        )
        return project

    return copy


@dataclass
class KedroProcess:
    """A ``kedro run`` in a process of its own, and the file its console goes to (not a pipe,
    which a long run would fill and block on)."""

    process: subprocess.Popen
    console: Path


@pytest.fixture
def kedro_run() -> Callable[..., KedroProcess]:
    """Starts ``kedro run --env smoke ARGUMENTS`` in a project (console: ``kedro_run.log``
    in it)."""

    def start(project: Path, *arguments: str) -> KedroProcess:
        console = project / "kedro_run.log"
        with console.open("w") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "kedro", "run", "--env", "smoke", *arguments],
                cwd=project,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        return KedroProcess(process, console)

    return start


def as_real_users(data: Path) -> None:
    """Rewrite the agent world's tables under ``data`` as the Pick-a-Pic ingestion writes
    them: users without attributes or weights and with digit ids (in every table), images
    whose subject is their caption, without attributes, and interactions whose prompt is the
    image's caption."""
    tables = data / "02_intermediate"
    users = pd.read_parquet(tables / "users.parquet")
    empty = [[] for _ in range(len(users))]
    users.assign(liked_attributes=empty, disliked_attributes=empty)[list(USERS_COLUMNS)].to_parquet(
        tables / "users.parquet"
    )
    images = pd.read_parquet(tables / "images.parquet")
    images.assign(
        subject=images["caption"], attributes=[[] for _ in range(len(images))], source=SOURCE
    )[list(IMAGES_COLUMNS)].to_parquet(tables / "images.parquet")
    interactions = pd.read_parquet(tables / "interactions.parquet")
    caption = images.set_index("image_id")["caption"]
    interactions.assign(prompt=caption[interactions["image_id"]].to_numpy())[
        list(INTERACTIONS_COLUMNS)
    ].to_parquet(tables / "interactions.parquet")
    digits = {user_id: str(1000 + k) for k, user_id in enumerate(sorted(users["user_id"]))}
    for path in data.rglob("*.parquet"):
        table = pd.read_parquet(path)
        if "user_id" in table:
            table.assign(user_id=table["user_id"].map(digits)).to_parquet(path)


QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def make_conditioning_clip() -> Callable[..., CLIPModel]:
    """Builds a one-layer conditioning CLIP (width 16) for ``image_size`` pictures."""

    def make(
        image_size: int, *, patch_size: int = 4, vocab_size: int = 50, seed: int = 0
    ) -> CLIPModel:
        return build_conditioning_clip(
            image_size=image_size,
            patch_size=patch_size,
            vision_width=16,
            vision_layers=1,
            text_width=16,
            text_layers=1,
            heads=2,
            projection_dim=8,
            max_text_length=24,
            vocab_size=vocab_size,
            seed=seed,
        )

    return make


@pytest.fixture(scope="session")
def make_qwen2_vl_processor() -> Callable[[Iterable[str]], Qwen2VLProcessor]:
    """Builds a Qwen2-VL processor from a corpus: Qwen's special tokens and chat layout
    around a small BPE trained on it (the hub tokenizer is not on this machine); images are
    resized to 56×56, i.e. 4 image tokens each."""

    def build(corpus: Iterable[str]) -> Qwen2VLProcessor:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.train_from_iterator(
            [*corpus, "user assistant"],
            trainers.BpeTrainer(
                vocab_size=400,
                special_tokens=list(QWEN2_VL_SPECIAL_TOKENS),
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            ),
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
        return Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(),
            chat_template=QWEN2_VL_CHAT_TEMPLATE,
        )

    return build
