"""`llama3 finetune`: LoRA and full runs from a base, formats in and out, resume, bad input."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from hf_reference import hf_logits, make_hf_model
from test_train import _env, _wait_for_step, assert_trees_equal, final_state, losses

from llama_jax import cli, formats
from llama_jax.api import Llama3
from llama_jax.formats import checkpoint
from llama_jax.model import lora

TOKENS = np.random.default_rng(1).integers(0, 400, size=(2, 20))
RANK = 4


@pytest.fixture(scope="session")
def ft_data(tmp_path_factory):
    """chatterbot/en dialogs as train/valid jsonl, a SentencePiece tokenizer, a random HF base."""
    from llama_jax.data import chat
    from llama_jax.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("ft")
    dialogs = chat.read_dialogs("chatterbot/en", "train")[:160]
    for name, part in (("train", dialogs[:128]), ("valid", dialogs[128:])):
        with open(root / f"{name}.jsonl", "w") as f:
            for m in part:
                f.write(json.dumps({"messages": m}) + "\n")
    (root / "text.txt").write_text("".join(x["content"] + "\n" for m in dialogs for x in m))
    train_tokenizer(str(root / "text.txt"), 400, str(root / "tok"), show_progress=False)
    base = root / "base"
    make_hf_model(str(base), seed=0, vocab=400, max_pos=256, layout=5)
    shutil.copy(root / "tok" / "tokenizer.model", base / "tokenizer.model")
    return {
        k: str(root / v)
        for k, v in dict(root="", train="train.jsonl", valid="valid.jsonl", base="base").items()
    }


def _cmd(d, run, *extra):
    return [
        sys.executable, "-m", "llama_jax.cli", "finetune",
        "--init_from", d["base"], "--data_path", d["train"], "--valid_data_path", d["valid"],
        "--model_path", str(run), "--config", "experiments/sft_chat.py:runlocal",
        "--config.seq_len=64", "--config.num_steps=10", "--config.checkpoint_every=1",
        "--config.progress=false", "--config.tensorboard=false", "--config.peak_flops=1e11",
        "--config.log_every=1", "--config.eval_batches=1", "--config.lora.dropout=0.1",
        *extra,
    ]  # fmt: skip


def _run(cmd, devices=2, **kw):
    return subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="session")
def lora_run(ft_data, tmp_path_factory):
    """An uninterrupted 10-step LoRA run (rank 4, dropout on) on 2 devices; only its last step
    is saved (a save a step costs seconds, and the interrupted runs save their own)."""
    run = tmp_path_factory.mktemp("lora") / "run"
    before = (Path(ft_data["base"]) / "model.safetensors").read_bytes()
    done = _run(_cmd(ft_data, run, "--lora_rank", str(RANK), "--config.checkpoint_every=1000"))
    assert done.returncode == 0, done.stderr[-3000:]
    after = (Path(ft_data["base"]) / "model.safetensors").read_bytes()
    assert before == after
    return str(run)


def test_checkpoint_holds_only_adapters(ft_data, lora_run):
    config, _ = formats.load_hf(ft_data["base"])
    step, state = final_state(lora_run)
    assert step == 10
    leaves = state["params"]["layers"]
    per_layer = RANK * sum(
        a + b for a, b in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 96), (64, 96), (96, 64)]
    )
    n_adapter = config.n_layers * per_layer
    assert lora.count(state["params"]) == n_adapter
    assert set(leaves) == {"attention", "mlp"} and "embedding" not in state["params"]
    # AdamW's two moments are the only other arrays of adapter size.
    opt_bytes = sum(np.asarray(x).size for x in jax.tree.leaves(state["opt_state"]))
    assert 2 * n_adapter <= opt_bytes <= 2 * n_adapter + 16
    assert n_adapter < config.param_count() / 10
    # On disk: params + two moments of the adapters, less than one float32 copy of the base.
    state_dir = Path(lora_run) / "checkpoints" / "10" / "state"
    size = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file())
    print("checkpoint state bytes", size, "adapter bytes x3", 12 * n_adapter)
    assert 12 * n_adapter <= size < 4 * config.param_count()


def test_merged_minus_base_has_rank_r_and_run_loads_merged(ft_data, lora_run):
    config, base = formats.load_hf(ft_data["base"])
    merged = Llama3.from_pretrained(lora_run, dtype="float32")
    for module, names in (("attention", ("wq", "wk", "wv", "wo")),
                          ("mlp", ("w_gate", "w_up", "w_down"))):  # fmt: skip
        for t in names:
            w0 = np.asarray(base["layers"][module][t])
            w1 = np.asarray(merged.params["layers"][module][t])
            n_in = 2 if t == "wo" else 1
            for i in range(config.n_layers):
                d = (w1[i] - w0[i]).reshape(int(np.prod(w0.shape[1 : 1 + n_in])), -1)
                assert np.abs(d).max() > 0
                sv = np.linalg.svd(d.astype(np.float64), compute_uv=False)
                assert sv[RANK] <= 1e-4 * sv[0] < sv[RANK - 1]  # float32 rounding only
    same = Llama3.from_pretrained(ft_data["base"], dtype="float32", adapter=lora_run)
    np.testing.assert_array_equal(merged.logits(TOKENS), same.logits(TOKENS))


def test_export_peft_and_hf_load_with_the_same_logits(ft_data, lora_run, tmp_path):
    ours = Llama3.from_pretrained(lora_run, dtype="float32").logits(TOKENS)
    out = tmp_path / "peft"
    assert cli.main(["convert", "--input", lora_run, "--output", str(out), "--format", "peft"]) == 0
    base = transformers.LlamaForCausalLM.from_pretrained(ft_data["base"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    assert np.abs(hf_logits(model, TOKENS) - ours).max() <= 1e-4
    hf = tmp_path / "hf"
    assert cli.main(["convert", "--input", lora_run, "--output", str(hf), "--format", "hf"]) == 0
    merged = transformers.LlamaForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    assert np.abs(hf_logits(merged, TOKENS) - ours).max() <= 1e-4
    # ...and the PEFT export imports back as the same model, in Python and on the command line.
    again = Llama3.from_pretrained(ft_data["base"], dtype="float32", adapter=str(out))
    assert np.abs(again.logits(TOKENS) - ours).max() <= 1e-5


def test_generate_with_adapter_flag_equals_the_run(ft_data, lora_run, tmp_path, capsys):
    out = tmp_path / "peft"
    assert cli.main(["convert", "--input", lora_run, "--output", str(out), "--format", "peft"]) == 0
    assert f"wrote the PEFT adapter (rank {RANK}) of {lora_run}" in capsys.readouterr().out
    flags = ["--temperature", "0", "--max_new_tokens", "6", "--dtype", "float32", "Hello"]
    assert cli.main(["generate", "--model_path", lora_run, *flags]) == 0
    want = capsys.readouterr().out
    assert (
        cli.main(["generate", "--model_path", ft_data["base"], "--adapter", str(out), *flags]) == 0
    )
    assert capsys.readouterr().out == want
    assert cli.main(["generate", "--model_path", ft_data["base"], "--adapter", "nope", *flags]) == 1
    assert capsys.readouterr().err.strip() == "error: adapter='nope' is not a directory"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_interrupted_lora_run_resumes_bitwise(ft_data, lora_run, tmp_path, sig):
    run = tmp_path / "run"
    # SIGTERM must save by itself: no periodic checkpoints then.
    extra = ["--lora_rank", str(RANK)] + (
        ["--config.checkpoint_every=1000"] * (sig != signal.SIGKILL)
    )
    stop_at = random.Random(os.getpid()).randint(3, 7)
    proc = subprocess.Popen(_cmd(ft_data, run, *extra), env=_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_step(str(run), stop_at, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    if sig == signal.SIGTERM:
        assert proc.returncode == 0 and "SIGTERM" in err, err[-3000:]
        assert len(checkpoint.committed_steps(str(run / "checkpoints"))) == 1
    resumed = _run(_cmd(ft_data, run, *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert losses(str(run)) == losses(lora_run)
    assert_trees_equal(final_state(str(run))[1], final_state(lora_run)[1])


def test_two_processes_match_one(ft_data, lora_run, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    multi = tmp_path / "multi"
    args = _cmd(ft_data, multi, "--lora_rank", str(RANK))[4:]  # after "llama_jax.cli finetune"
    i = args.index("--config")
    del args[i : i + 2]  # multiprocess.sh passes --config itself
    proc = subprocess.run(
        ["bash", os.path.join(root, "launch", "multiprocess.sh"), "2", "1",
         "experiments/sft_chat.py:runlocal", *args],
        env=_env(1) | {"LOG_DIR": str(tmp_path / "logs"), "COMMAND": "finetune"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    a, b = losses(str(multi)), losses(lora_run)  # lora_run: 1 process, 2 devices
    assert sorted(a) == sorted(b)
    np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], atol=1e-5)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
        final_state(str(multi))[1]["params"],
        final_state(lora_run)[1]["params"],
    )


def test_adapter_on_another_base_is_refused(ft_data, lora_run, tmp_path):
    other = tmp_path / "other"
    make_hf_model(str(other), seed=9, vocab=400, max_pos=256, layout=5)
    with pytest.raises(ValueError, match="base weights differ"):
        Llama3.from_pretrained(str(other), dtype="float32", adapter=lora_run)
    wider = tmp_path / "wider"
    make_hf_model(str(wider), seed=0, vocab=400, mlp=128, max_pos=256, layout=5)
    with pytest.raises(ValueError, match="another architecture"):
        Llama3.from_pretrained(str(wider), dtype="float32", adapter=lora_run)


def _cli(d, run, *extra, capsys):
    """`llama3 finetune` in this process (8 fake devices): (exit status, last stderr line)."""
    argv = _cmd(d, run, "--config.num_steps=1", *extra)[3:]
    status = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return status, err[-1] if err else ""


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.lora.targets=wq,q_proj"], "unknown lora target.*'q_proj'.*valid: wq, wk"),
        (["--lora_rank", "-1"], "lora.rank=-1: LoRA needs an integer rank > 0"),
        (["--config.train_on=user"], "train_on='user'; valid: assistant, last, all"),
        (["--config.seq_len=8", "--config.truncation=drop"], "no example left.*raise seq_len"),
        (["--config.lora.dropout=1.0"], "lora dropout must be in \\[0, 1\\)"),
    ],
)
def test_bad_input_is_one_line_before_compiling(ft_data, tmp_path, capsys, extra, message):
    status, last = _cli(ft_data, tmp_path / "r", *extra, capsys=capsys)
    assert status == 1 and last.startswith("error: ") and re.search(message, last), last
    assert not os.path.isdir(tmp_path / "r" / "checkpoints")


def test_bad_rows_name_the_file_and_line(ft_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = Path(ft_data["train"]).read_text().splitlines()[:3]
    bad.write_text("\n".join([rows[0], rows[1][:-5], rows[2]]) + "\n")
    status, last = _cli(dict(ft_data, train=str(bad)), tmp_path / "r", capsys=capsys)
    assert status == 1 and f"{bad}:2: malformed JSON line" in last, last
    robot = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                     {"role": "robot", "content": "beep"}]})  # fmt: skip
    bad.write_text("\n".join([rows[0], rows[1], robot]) + "\n")
    status, last = _cli(dict(ft_data, train=str(bad)), tmp_path / "r", capsys=capsys)
    assert status == 1, last
    assert last == (
        f"error: {bad}:3: message 1 has unknown role 'robot'; valid: system, user, assistant"
    )
    assert not os.path.isdir(tmp_path / "r" / "checkpoints")


def test_dialogs_without_an_answer_are_counted_and_said(ft_data, tmp_path, capsys):
    questions = [json.dumps({"messages": [{"role": "user", "content": q}]}) for q in "ab"]
    mixed, only = tmp_path / "mixed.jsonl", tmp_path / "questions.jsonl"
    mixed.write_text("\n".join([json.dumps({"prompt": "why?", "completion": "so"}), *questions]))
    only.write_text("\n".join(questions) + "\n")
    # The training file keeps one dialog and skips two (a console warning); the validation
    # file has nothing left to evaluate (the error), so nothing compiles.
    argv = _cmd(dict(ft_data, train=str(mixed), valid=str(only)), tmp_path / "r")[3:]
    assert cli.main(argv + ["--config.num_steps=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    said = r"train: 3 dialogs -> 1 examples \(\d+ target tokens\); skipped 2 with no assistant"
    assert any(re.search(said, line) for line in err), err
    assert err[-1] == (
        "error: validation: no example left to train on (of: 2 dialogs -> 0 examples (0 "
        "target tokens); skipped 2 with no assistant turn; 0 truncated, 0 dropped as longer "
        "than seq_len); every dialog needs an assistant turn"
    )
    assert not os.path.isdir(tmp_path / "r" / "checkpoints")


def test_architecture_comes_from_the_base(ft_data, tmp_path, capsys):
    argv = _cmd(ft_data, tmp_path / "r", "--config.model.vocab_size=10", "--print_config")[3:]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "vocab_size: 400" in out and "rank: 8" in out  # runlocal's rank; base's vocab


def test_tokenizer_larger_than_the_base_vocab_is_refused(ft_data, tmp_path, capsys):
    small = tmp_path / "small"
    make_hf_model(str(small), seed=0, vocab=256, max_pos=256, layout=5)
    shutil.copy(os.path.join(ft_data["base"], "tokenizer.model"), small / "tokenizer.model")
    status, last = _cli(dict(ft_data, base=str(small)), tmp_path / "r", capsys=capsys)
    assert status == 1, last
    assert last.startswith(
        f"error: the tokenizer of {small} has 400 ids but the base {small} has vocab_size=256, "
        "which a run started from a base cannot change; "
    )
    assert "model.vocab_size" not in last  # the pretraining hint does nothing here
    tok = os.path.join(ft_data["root"], "tok")
    status, last = _cli(dict(ft_data, base=str(small)), tmp_path / "r",
                        f"--config.tokenizer_path={tok}", capsys=capsys)  # fmt: skip
    assert status == 1 and last == (
        f"error: the tokenizer {tok} has 400 ids but the base {small} has vocab_size=256, which "
        "a run started from a base cannot change; use the base's own (leave tokenizer_path "
        "empty) or one of <= 256 ids"
    )
    assert not os.path.isdir(tmp_path / "r" / "checkpoints")


def _files(root) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_the_base_directory_is_not_a_run_directory(ft_data, capsys):
    before = _files(ft_data["base"])
    status, last = _cli(ft_data, ft_data["base"] + "/", capsys=capsys)
    assert status == 1 and last == (
        f"error: model_path='{ft_data['base']}/' is the base model's own directory (init_from); "
        "give the fine-tune a new directory"
    )
    assert _files(ft_data["base"]) == before


def test_resume_needs_the_same_kind_of_run_and_the_same_base(ft_data, lora_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    kept = lambda: {k: v for k, v in _files(run).items() if not k.endswith(".log")}  # noqa: E731
    before = kept()
    status, last = _cli(ft_data, run, "--lora_rank", "2", capsys=capsys)
    assert status == 1 and re.fullmatch(
        rf"error: model_path='{run}' holds a LoRA \(rank=4, alpha=16, dropout=0.1, targets=wq,"
        r"wk,wv,wo,w_gate,w_up,w_down\) fine-tune \(step 10\); this one is LoRA \(rank=2, .*: "
        "resume with the same settings, or use a new directory",
        last,
    ), last
    status, last = _cli(ft_data, run, "--lora_rank", "0", capsys=capsys)
    assert status == 1 and "; this one is full (lora.rank=0): resume" in last, last
    other = tmp_path / "other"  # the same architecture and tokenizer, other weights
    make_hf_model(str(other), seed=9, vocab=400, max_pos=256, layout=5)
    shutil.copy(os.path.join(ft_data["base"], "tokenizer.model"), other / "tokenizer.model")
    status, last = _cli(dict(ft_data, base=str(other)), run, "--lora_rank", str(RANK),
                        capsys=capsys)  # fmt: skip
    assert status == 1 and re.match(
        rf"error: init_from={other} is not the base {run} was fine-tuned from \(weights "
        rf"fingerprint sha256:\w+\.\.\., recorded sha256:\w+\.\.\. for {ft_data['base']}\)",
        last,
    ), last
    assert kept() == before
    (run / "finetune.json").unlink()  # now like a pretraining run's directory
    status, last = _cli(ft_data, run, "--lora_rank", str(RANK), capsys=capsys)
    assert status == 1 and last.startswith(
        f"error: model_path='{run}' holds checkpoints (step 10) of a run that is not a fine-tune"
    ), last
