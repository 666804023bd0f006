"""Plumbing every job shares: logging, storage from flags, Ray start-up, model fingerprints, the CLI wrapper."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from jobs.config import ConfigError, parse_config
from workers.storage import Storage, StorageSettings, redact

logger = logging.getLogger("sgbatch")


class RunExistsError(RuntimeError):
    """The run folder exists and neither --resume nor --overwrite was given."""


class RedactingFilter(logging.Filter):
    """Replaces ``user:password@`` in every URL of a record's message before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
_PROGRAM: contextvars.ContextVar[str | None] = contextvars.ContextVar("sgbatch_program", default=None)


@contextlib.contextmanager
def invoked_as(program: str) -> Iterator[None]:
    """Name the running command (``sgbatch generate``) in usage and help instead of ``python -m jobs.…``."""
    token = _PROGRAM.set(program)
    try:
        yield
    finally:
        _PROGRAM.reset(token)


def program(default: str) -> str:
    """The command as the user typed it: ``sgbatch <job>`` under the CLI, else ``default``."""
    return _PROGRAM.get() or default


def configure_logging() -> None:
    """Progress lines on stdout (what ``ray job logs`` shows), whatever logging Ray set up before."""
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s sgbatch %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def storage_for(config: Any) -> Storage:
    """The storage of a job config's ``--s3-endpoint-url`` / ``--s3-region`` (and the AWS environment)."""
    return Storage(StorageSettings.from_env(endpoint_url=config.s3_endpoint_url, region=config.s3_region))


def fingerprint(storage: Storage, model: str) -> str:
    """A short id of a model: its files' names, sizes and bytes locally; its file listing on S3."""
    from sgmodel.fingerprint import model_fingerprint

    if model.startswith("s3://"):
        listing = storage.list(model.rstrip("/"))
        return hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]
    return model_fingerprint(model)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("sgbatch", "ray", "torch", "diffusers", "transformers", "torch_geometric", "pyarrow", "deepspeed"):
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            continue
    return out


def init_ray(dashboard: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``), else start a local instance.

    ``dashboard``: start the local instance with its dashboard, which serves Ray's State API. Ray
    Train's placement-group cleaner asks that API every second whether the training controller is
    alive and, without it, logs a warning each time (most of a fine-tuning log). A cluster has it.
    """
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=dashboard, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    # Ordered blocks give the generator the same batches on every run: images are only batch-invariant
    # to ~1e-5 (kernels reduce in another order for other batch shapes), enough to flip a PNG byte.
    ctx.execution_options.preserve_order = True


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def write_report(storage: Storage, run_uri: str, max_images: int) -> str | None:
    """The HTML report's location; a failure to draw it never fails the run (None then)."""
    from jobs.report import build_report

    try:
        return build_report(storage, run_uri, max_images=max_images)
    except Exception:  # noqa: BLE001 - the data is written; the report is a convenience
        logger.exception("could not write the report for %s", run_uri)
        return None


def job_main(config_cls: type, run_fn: Callable[[Any], tuple[dict, int]], argv: Sequence[str] | None,
             prog: str) -> int:
    """CLI front of a job: bad input (flags, config file, an existing or busy run, missing or unreadable
    input, S3 without credentials) exits 2 with the reason on one line; a run whose lease another run
    took over exits 1 the same way."""
    from jobs.inputs import InputFileError
    from jobs.lease import LeaseLostError

    configure_logging()
    try:
        cfg = parse_config(config_cls, argv, prog=program(prog))
        _, code = run_fn(cfg)
    except (ConfigError, RunExistsError, FileNotFoundError, InputFileError) as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    except LeaseLostError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - S3 without credentials, found wherever it is first needed
        if type(err).__name__ not in ("NoCredentialsError", "PartialCredentialsError"):
            raise
        print(f"error: S3: {err} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)",
              file=sys.stderr)
        return 2
    return code
