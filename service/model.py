"""The model a process serves: its file checked against the manifest, which gives the version
that answers report, and its onnxruntime sessions started with the configured settings. Free of
the web stack and the database, so that the record command (``service.record``) loads neither;
and of onnxruntime until a model is checked or an engine starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.config import MAX_MODEL_VERSION, Config
from service.logs import first_line
from service.manifest import ModelError, verify_model
from service.process import StartupError

if TYPE_CHECKING:
    from service.engine import Engine


def model_version(config: Config) -> int:
    """The model file checked against its manifest, and the version responses report."""
    try:
        manifest_version = verify_model(config.model_path, config.manifest)
    except ModelError as exc:
        raise StartupError(str(exc)) from None
    version = config.model_version if config.model_version is not None else manifest_version
    if version is None:
        raise StartupError(f"Manifest {config.manifest} has no integer model_version and MODEL_VERSION is not set.")
    if not 0 <= version <= MAX_MODEL_VERSION:
        raise StartupError(
            f"The model_version of {config.manifest} must be from 0 to {MAX_MODEL_VERSION} (got {version})."
        )
    return version


def start_engine(config: Config) -> Engine:
    """The model in onnxruntime sessions, warmed up with the batches the service will run."""
    from service.engine import Engine

    engine = Engine(
        config.model_path,
        threads=config.ort_threads,
        spinning=config.ort_spinning,
        lone_threads=config.ort_lone_threads,
        warm_batch=config.batch_max_size,
        warm_concurrent=config.batch_workers,
        lone_spinning=config.ort_lone_spinning,
    )
    try:
        return engine.start()
    except Exception as exc:  # onnxruntime's errors share no base class beyond Exception
        raise _cannot_load(config, exc) from None


def check_model(config: Config) -> None:
    """What ``start_engine`` would refuse, found cheaply, in the start-up checks' process
    (``service.startup``): a model the workers cannot serve is one sentence before they start."""
    from service.engine import check_model as check

    try:
        check(config.model_path)
    except Exception as exc:
        raise _cannot_load(config, exc) from None


def _cannot_load(config: Config, exc: Exception) -> StartupError:
    return StartupError(f"onnxruntime cannot load {config.model_path}: {first_line(exc)}")
