"""The metrics writer: metrics.jsonl and TensorBoard."""

import json

from llama_jax.training.metrics import MetricsWriter


def test_metrics_writer_takes_an_unknown_mfu(tmp_path):
    """On a CPU the MFU is None (n/a): metrics.jsonl says null and TensorBoard gets no point
    (tensorboardX raised on None, which ended every CPU run with TensorBoard on at its first
    logged step)."""
    w = MetricsWriter(str(tmp_path), tensorboard=True)
    w.write(10, {"loss": 2.5, "mfu": None})
    w.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 10 and row["loss"] == 2.5 and row["mfu"] is None
    assert list((tmp_path / "tb").iterdir())
