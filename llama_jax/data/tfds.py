"""TFDS datasets without TensorFlow: builders prepared as ArrayRecord, their output quieted."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any


def tfds_builder(
    name: str,
    version: str | None = None,
    *,
    data_dir: str | None = None,
    download: bool = True,
    manual_dir: str | None = None,
) -> Any:
    """Returns the TFDS builder for `name`, prepared as ArrayRecord in `data_dir`.

    Raises:
      ValueError: the dataset is unknown, or not prepared and `download` is False.
    """
    import tensorflow_datasets as tfds

    full = name + (f":{version}" if version else "")
    try:
        builder = tfds.builder(full, data_dir=data_dir, file_format="array_record")
    except Exception as e:  # DatasetNotFoundError and friends
        raise ValueError(
            f"TFDS dataset {full!r} is neither a registered builder nor prepared in "
            f"data_dir={data_dir!r}: {str(e).splitlines()[0]}"
        ) from None
    if not builder.is_prepared():
        if not download:
            raise ValueError(
                f"TFDS dataset {full!r} is not prepared in {builder.data_dir}; pass "
                "download=True to prepare it, or point data_dir at a prepared copy"
            )
        prepare_tfds(builder, manual_dir=manual_dir)
    return builder


def _no_missing_dataset_info(record: logging.LogRecord) -> bool:
    # A dataset that is about to be prepared has no dataset_info.json yet: nothing to say.
    return "has no dataset_info.json" not in record.getMessage()


@contextlib.contextmanager
def quiet_tfds():
    """TFDS prints ("Downloading and preparing dataset ...") and draws progress bars while it
    prepares a dataset: both go to the log (the run's log file in a training run) instead."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    shown = getattr(tqdm_utils, "_active", True)
    out = io.StringIO()
    absl = logging.getLogger("absl")
    absl.addFilter(_no_missing_dataset_info)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        tfds.display_progress_bar(shown)
        absl.removeFilter(_no_missing_dataset_info)
        for line in out.getvalue().splitlines():
            if line.strip():
                logging.getLogger("llama_jax.data").info("tfds: %s", line.strip())


def prepare_tfds(builder: Any, *, manual_dir: str | None = None) -> None:
    """Runs `download_and_prepare` writing ArrayRecord, without touching GCS (needs TF)."""
    import tensorflow_datasets as tfds

    config = tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=manual_dir)
    with quiet_tfds():
        builder.download_and_prepare(download_config=config, file_format="array_record")
