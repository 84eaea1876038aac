"""Issue 23's faults, each reproduced: a checkpoint write that fails (immutable directory, a
mocked permission or disk error), bit flips and edited files on every load, a full disk under
the tokenizer trainer, and what `llama3 eval` / `llama3 serve` do with broken inputs. Each
asserts the one line the user sees, the exit status, a time bound and what is left on disk."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from test_train import corpus, tiny_config

from llama_jax.formats import checkpoint
from llama_jax.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def _experiment_file(tmp_path, corpus, run_dir, **overrides) -> str:
    """An experiments/NAME.py for `llama3 train --config` in a subprocess: the tiny model."""
    sets = "\n".join(f"    c.{k} = {v!r}" for k, v in overrides.items())
    path = tmp_path / "tiny_experiment.py"
    path.write_text(
        textwrap.dedent(
            f"""
            from llama_jax.training.experiment import base_config, model_config_dict

            def get_config(arg=None):
                c = base_config()
                c.model = model_config_dict("tiny", vocab_size=512, max_seq_len=128)
                c.data_path = {corpus["data"]!r}
                c.train_split, c.valid_split = "train[:85%]", "train[85%:]"
                c.tokenizer_path = {corpus["tokenizer"]!r}
                c.seq_len, c.batch_size, c.num_steps = 32, 8, 3
                c.warmup_steps, c.log_every, c.eval_batches = 1, 1, 1
                c.peak_flops, c.progress, c.tensorboard = 1e11, False, False
                c.cache_dir = {str(tmp_path / "cache")!r}
                c.run_dir = {str(run_dir)!r}
            """
        )
        + sets
        + "\n    return c\n"
    )
    return str(path)


def _llama3(args: list[str], timeout: float, env: dict | None = None):
    """`llama3 ARGS` as its own process (the console script's `main()`), timed."""
    code = "import sys; from llama_jax.cli import main; sys.exit(main())"
    t0 = time.perf_counter()
    p = subprocess.run(
        [PY, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,  # a hang fails the test here instead of waiting forever
        env={**os.environ, **(env or {})},
    )
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0


# ------------------------------------------------------------------------- 1. checkpoint writes
def _can_make_immutable(path) -> bool:
    return shutil.which("chattr") is not None and (
        subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    )


def test_immutable_checkpoints_dir_is_one_line_and_the_process_exits(corpus, tmp_path):
    """Before: a traceback, then the process hung forever on orbax's non-daemon threads."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    cfg = _experiment_file(tmp_path, corpus, run, checkpoint_every=1)
    if not _can_make_immutable(ckpts):
        if os.geteuid() == 0:
            pytest.skip("chattr +i is not available here and root ignores permissions")
        ckpts.chmod(0o555)
    try:
        code, out, err, seconds = _llama3(["train", "--config", cfg], timeout=240)
    finally:
        subprocess.run(["chattr", "-i", str(ckpts)], capture_output=True)
        ckpts.chmod(0o755)
    lines = _error_lines(err)
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert str(ckpts) in lines[0] and "step 1" in lines[0], lines[0]
    assert "writable" in lines[0] and "no checkpoint was written" in lines[0], lines[0]
    assert os.listdir(ckpts) == []


def test_permission_lost_mid_run_names_the_last_good_step(corpus, tmp_path, monkeypatch):
    """A mocked EACCES from the third save on: the error names the failed step and the
    newest step a rerun resumes from, and that step really resumes."""
    c = tiny_config(corpus, tmp_path / "run", num_steps=6, checkpoint_every=2)
    c.cache_dir = str(tmp_path / "cache")
    c.async_checkpointing = False
    real_save = checkpoint.TrainCheckpointer.save

    def save(self, step, *a, **k):
        if step >= 4:
            with self._disk_errors(step):
                raise PermissionError(13, "Permission denied", self.directory)
        return real_save(self, step, *a, **k)

    monkeypatch.setattr(checkpoint.TrainCheckpointer, "save", save)
    with pytest.raises(checkpoint.CheckpointError) as e:
        trainer.train(c)
    msg = str(e.value)
    assert "\n" not in msg
    assert "cannot write checkpoint step 4" in msg and "Permission denied" in msg, msg
    assert "newest intact checkpoint is step 2" in msg, msg
    assert checkpoint.committed_steps(os.path.join(c.run_dir, "checkpoints")) == [2]


def test_disk_full_mid_async_save_names_the_last_good_step(corpus, tmp_path, monkeypatch):
    """ENOSPC surfacing from an async save at the next save (orbax raises it there): the
    message names the step that failed, not the one being started, and the one before it."""
    c = tiny_config(corpus, tmp_path / "run", num_steps=8, checkpoint_every=2)
    c.cache_dir = str(tmp_path / "cache")
    c.async_checkpointing = False
    real_save = checkpoint.TrainCheckpointer.save

    def save(self, step, *a, **k):
        if step == 6:  # the save of step 4 "failed" in the background: 6 finds it
            self._in_flight = 4
            shutil.rmtree(os.path.join(self.directory, "4"), ignore_errors=True)
            with self._disk_errors(step):
                raise OSError(28, "No space left on device")
        return real_save(self, step, *a, **k)

    monkeypatch.setattr(checkpoint.TrainCheckpointer, "save", save)
    with pytest.raises(checkpoint.CheckpointError) as e:
        trainer.train(c)
    msg = str(e.value)
    assert "\n" not in msg
    assert "No space left on device while saving step 4" in msg, msg
    assert "newest intact checkpoint is step 2" in msg, msg


# ------------------------------------------------------------------------- 2. every load verifies
@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    """A tiny run with committed steps 2, 4 and 6 (each with its verification record)."""
    run = tmp_path_factory.mktemp("faults") / "run"
    c = tiny_config(corpus, run, num_steps=6, checkpoint_every=2)
    c.cache_dir = str(run.parent / "cache")
    trainer.train(c)
    assert checkpoint.committed_steps(str(run / "checkpoints")) == [2, 4, 6]
    return {"run": run, "config": c}


def _copy_run(trained_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained_run["run"], dst)
    return dst


def _flip_a_bit(step_dir):
    """Bits flipped across each data file of the step's state (params and optimizer state
    share the files: spread out, so the params are hit too)."""
    for victim in [
        p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    ]:
        size = os.path.getsize(victim)
        with open(victim, "r+b") as f:
            for k in range(1, 16):  # spread over the file: every array is hit somewhere
                f.seek(size * k // 16)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0x01]))


def _params_of_step(run, step):
    return checkpoint.load_params(str(run / "checkpoints" / str(step) / "state"), subtree="params")


def _assert_same(a, b):
    import jax
    import numpy as np

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("damage", ["flip", "flip_without_record", "file_missing"])
def test_load_of_a_damaged_newest_step_falls_back_with_a_warning(
    trained_run, tmp_path, damage, caplog
):
    """Before: `from_pretrained`, generate, chat, serve and eval computed with the flipped bit."""
    from llama_jax.formats import load_any

    run = _copy_run(trained_run, tmp_path)
    if damage == "file_missing":  # before: eval failed where training fell back
        for p in (run / "checkpoints" / "6" / "state").rglob("*"):
            if p.is_file() and p.parent.name == "d":
                p.unlink()
    else:
        _flip_a_bit(run / "checkpoints" / "6")
    if damage == "flip_without_record":  # before: a deleted record hid the flip from resume too
        shutil.rmtree(run / "checkpoints" / "6" / "verify")
    with caplog.at_level("WARNING", logger="llama_jax"):
        _, params = load_any(str(run))
    _assert_same(params, _params_of_step(run, 4))
    warned = [r.getMessage() for r in caplog.records if "step 6" in r.getMessage()]
    assert warned and "loading step 4 instead" in warned[0], caplog.text
    why = {
        "flip": ("fingerprint", "unreadable"),
        "flip_without_record": ("lost its verification record",),
        "file_missing": ("unreadable",),
    }[damage]
    assert any(w in warned[0] for w in why), warned[0]


def test_no_good_step_is_one_line_from_generate(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path)
    for step in (2, 4, 6):
        _flip_a_bit(run / "checkpoints" / str(step))
    code, out, err, seconds = _llama3(
        ["generate", "--model_path", str(run), "--max_new_tokens", "2", "hi"], timeout=120
    )
    lines = _error_lines(err)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "no checkpoint in" in lines[0] and "step 6 " in lines[0] and "step 2 " in lines[0]


def test_resume_detects_a_deleted_record_and_an_edited_data_state(trained_run, tmp_path):
    """Before: both resumed silently (the second from the wrong place in the data)."""
    run = _copy_run(trained_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "6" / "verify")  # no flip: the record alone is gone
    data_files = [p for p in (run / "checkpoints" / "4" / "data").rglob("*") if p.is_file()]
    (data_file,) = [p for p in data_files if '"step"' in p.read_text()]
    state = json.loads(data_file.read_text())
    state["step"] = state["step"] + 3
    data_file.write_text(json.dumps(state))
    c = trained_run["config"].copy_and_resolve_references()
    c.run_dir, c.num_steps = str(run), 7
    trainer.train(c)
    with open(run / "train.log") as f:
        errors = [line for line in f if " ERROR " in line]
    assert len(errors) == 2, errors
    assert "step 6 has lost its verification record" in errors[0], errors[0]
    assert "step 4 has a data-loader state that does not match" in errors[1], errors[1]
    assert any(n.startswith("6.corrupt-") for n in os.listdir(run / "checkpoints"))


# ------------------------------------------------------------------------- 6. serve under abuse
@pytest.fixture(scope="module")
def guarded_server(corpus):
    import flax.linen as nn
    import jax

    from llama_jax import Llama3
    from llama_jax.model.config import get_config
    from llama_jax.model.transformer import init_params
    from llama_jax.serve.app import ServeApp
    from llama_jax.serve.engine import Engine
    from llama_jax.serve.server import ServerThread
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(corpus["tokenizer"])
    config = get_config("tiny", vocab_size=512, dim=32, mlp_dim=32, n_heads=4, n_kv_heads=2)
    params = nn.unbox(init_params(config, jax.random.key(0)))
    model = Llama3(config=config, params=params, dtype="float32", tokenizer=tok)
    engine = Engine(model.sampler(), max_batch=1, max_seq_len=64, max_queue=8)
    engine.start()
    app = ServeApp(engine, tok, "tiny", api_key=None)
    limits = dict(header_timeout=1.0, body_timeout=2.0, max_connections=32)
    with ServerThread(app, **limits) as srv:
        # No full warm-up (every bucket, minutes on a loaded CPU): these tests send one
        # request shape, compiled here so that no test's deadline includes a compile.
        assert _complete(srv, timeout=600).status_code == 200
        yield srv
    engine.close()


def _complete(server, timeout=30):
    import httpx

    body = {"model": "tiny", "prompt": "the", "max_tokens": 2, "temperature": 0}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=timeout)


def test_deeply_nested_json_is_400_not_500(guarded_server):
    import httpx

    body = b"[" * 100_000 + b"]" * 100_000
    r = httpx.post(
        guarded_server.url + "/v1/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and "nests JSON deeper than" in r.json()["error"]["message"]
    assert _complete(guarded_server).status_code == 200


def test_slow_clients_are_cut_off_and_do_not_lock_out_a_normal_one(guarded_server):
    """Before: a byte-at-a-time client kept its connection forever; enough of them stopped
    everyone else. Now 200 stalled clients (headers or body unfinished) are closed within
    their deadline or evicted, and a normal request is answered meanwhile."""
    import socket

    host, port = guarded_server.host, guarded_server.port
    stalled = []
    try:
        for i in range(200):
            s = socket.create_connection((host, port), timeout=5)
            if i % 2:  # headers never finished
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            else:  # headers done, body never finished
                s.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                    b"\r\nContent-Length: 100\r\n\r\n{"
                )
            stalled.append(s)
        t0 = time.perf_counter()
        r = _complete(guarded_server, timeout=20)
        assert r.status_code == 200, r.text
        assert time.perf_counter() - t0 < 10
        deadline = time.monotonic() + 6  # body_timeout 2 s, plus slack on a loaded machine
        for s in stalled:
            s.settimeout(max(deadline - time.monotonic(), 0.1))
            try:
                got = s.recv(1024)
            except ConnectionResetError:
                got = b""
            assert got == b"" or got.startswith(b"HTTP/1.1 4"), got[:200]
    finally:
        for s in stalled:
            s.close()
    assert _complete(guarded_server).status_code == 200


# ------------------------------------------------------------------------- 5. llama3 eval
def _yaml_task(tmp_path, data_file, body=None):
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "mine.yaml").write_text(
        body
        or textwrap.dedent(
            f"""
            task: mine
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data_file}
            test_split: test
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{{{text}}}}"
            """
        )
    )
    return tasks


def test_eval_names_a_bad_jsonl_line_and_an_unparsable_yaml(tmp_path, capsys):
    """Before: a non-UTF-8 byte named neither file nor line; a broken YAML was 'unknown task'."""
    from llama_jax import cli

    data = tmp_path / "docs.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    tasks = _yaml_task(tmp_path, data)
    argv = ["eval", "--model_path", str(tmp_path), "--tasks", "mine", "--include_path"]
    assert cli.main([*argv, str(tasks)]) == 1
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert f"data file {data} line 2: byte 0xe9 at column 14 is not UTF-8" in line, line
    _yaml_task(tmp_path, data, body="task: mine\ndoc_to_text: [unclosed\n")
    assert cli.main([*argv, str(tasks)]) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert "mine.yaml is not valid YAML" in line and "line 3" in line, line


@pytest.fixture()
def eval_stub(monkeypatch):
    """`llama3 eval` with the evaluation itself replaced (these cases are about what happens to
    the results afterwards): a fixed perplexity metric."""
    from llama_jax.eval import runner
    from llama_jax.eval.requests import Metric
    from llama_jax.inference import loaded

    monkeypatch.setattr(runner, "check_tasks", lambda *a, **k: (["shakespeare"], []))
    monkeypatch.setattr(loaded.LoadedModel, "from_pretrained", classmethod(lambda *a, **k: None))
    metric = Metric("shakespeare", "token_perplexity", 42.0, None, 3)
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: ([metric], {"shakespeare": 0}))


def test_eval_limit_is_not_logged_and_a_read_only_run_dir_is_one_line(
    trained_run, tmp_path, eval_stub, capsys
):
    from llama_jax import cli

    run = _copy_run(trained_run, tmp_path)
    before = (run / "metrics.jsonl").read_text()
    argv = ["eval", "--model_path", str(run), "--tasks", "shakespeare"]
    assert cli.main([*argv, "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "42" in out and "not logged to" in out and "--limit=5" in out
    assert (run / "metrics.jsonl").read_text() == before  # before: a partial result appended
    metrics = run / "metrics.jsonl"
    if not _can_make_immutable(metrics):
        if os.geteuid() == 0:
            pytest.skip("chattr +i is not available here and root ignores permissions")
        metrics.chmod(0o444)
    try:
        code = cli.main([*argv, "--output", str(tmp_path / "results.json")])
    finally:
        subprocess.run(["chattr", "-i", str(metrics)], capture_output=True)
    captured = capsys.readouterr()
    assert code == 1 and "42" in captured.out, captured
    (line,) = _error_lines(captured.err)
    assert "Traceback" not in captured.err
    assert f"cannot log to {run}/metrics.jsonl" in line and "results above" in line, line
    assert json.loads((tmp_path / "results.json").read_text())["results"]["shakespeare"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_perplexity_task_with_fewshot_is_scored_zero_shot(trained_run, monkeypatch, caplog):
    """Before: the README's `--num_fewshot 3` over shakespeare failed with "few-shot pool has
    only 0 examples", naming no task."""
    from llama_jax.eval import runner
    from llama_jax.eval import tasks as builtin
    from llama_jax.inference.loaded import LoadedModel

    docs = ["First Witch. When shall we three meet again", "Double, double toil and trouble"]
    task = dataclasses.replace(
        builtin.TASKS["shakespeare"], load=lambda cache=None: builtin.TaskData(documents=docs)
    )
    monkeypatch.setitem(builtin.TASKS, "shakespeare", task)
    model = LoadedModel.from_pretrained(str(trained_run["run"]))
    with caplog.at_level("WARNING", logger="llama_jax.eval"):
        three, _ = runner.evaluate(model, ["shakespeare"], num_fewshot=3, progress=False)
    zero, _ = runner.evaluate(model, ["shakespeare"], num_fewshot=0, progress=False)
    assert [m.value for m in three] == [m.value for m in zero]
    assert "shakespeare is perplexity: scored zero-shot" in caplog.text


# ------------------------------------------------------------------------- first use
def test_version_and_train_help_list_the_readme_flags(capsys):
    import re

    from llama_jax import __version__, cli

    assert cli.main(["--version"]) == 0 and __version__ in capsys.readouterr().out
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    used = set()
    for cmd in re.findall(r"llama3 train[^\n]*(?:\\\n[^\n]*)*", readme):
        used |= {f for f in re.findall(r"(--[a-z_]+)", cmd) if f != "--config"}
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert used and all(f in help_text for f in used), used - set(help_text.split())


def test_batch_size_eight_is_our_own_line(capsys):
    from llama_jax import cli

    assert cli.main(["train", "--data_path", "x", "--batch_size", "eight"]) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert line == "error: --batch_size='eight'; valid: an integer, e.g. 8"


def test_mfu_on_cpu_is_not_reported_above_a_peak(trained_run):
    rows = [json.loads(x) for x in (trained_run["run"] / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in rows if "mfu" in r]
    assert mfus  # tiny_config sets peak_flops: a configured peak is used as given
    from llama_jax.training import metrics

    row = metrics.summarise(
        [{"finite": True, "loss": 1.0, "grad_norm": 1.0, "learning_rate": 1}], 1.0, 64, 1e9, 0.0
    )
    assert row["mfu"] is None  # unknown peak (CPU): n/a, never a ratio over a guess


def test_chat_keeps_the_system_prompt_drops_old_turns_and_fails_nonzero(
    trained_run, monkeypatch, capsys
):
    import io

    from llama_jax import Llama3, cli
    from llama_jax.inference.text_stream import run_chat

    model = Llama3.from_pretrained(str(trained_run["run"]))
    assert model.config.max_seq_len == 128
    turn = " ".join(["the king and the queen"] * 5)  # ~30 tokens a turn
    out, errors = [], []
    messages = run_chat(
        model, [turn] * 6, out.append, "Be brief.", "", errors, max_new_tokens=16, temperature=0
    )
    assert errors == [] and messages[0] == {"role": "system", "content": "Be brief."}
    assert "oldest turn(s) to fit the context" in "".join(out)
    assert len(model.tokenizer.encode_dialog(messages)) <= 128
    monkeypatch.setattr("sys.stdin", io.StringIO(turn * 10 + "\n"))  # one turn over the context
    argv = ["chat", "--model_path", str(trained_run["run"]), "--max_new_tokens", "4"]
    assert cli.main(argv) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert "1 turn(s) failed" in line and "truncate" in line, line
    monkeypatch.setattr("sys.stdin", io.StringIO(turn * 10 + "\n"))
    assert cli.main([*argv, "--truncate"]) == 0  # before: --truncate was ignored by chat


def test_hf_export_carries_the_models_own_ids_and_generates_like_ours(trained_run, tmp_path):
    import numpy as np
    import torch
    import transformers

    from llama_jax import Llama3, cli
    from llama_jax.tokenizer import load_tokenizer

    out = tmp_path / "hf"
    assert (
        cli.main(
            ["convert", "--input", str(trained_run["run"]), "--output", str(out), "--format", "hf"]
        )
        == 0
    )
    tok = load_tokenizer(str(trained_run["run"]))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    gen = transformers.GenerationConfig.from_pretrained(str(out))
    assert gen.bos_token_id == tok.bos_id and tok.eos_id in np.atleast_1d(gen.eos_token_id)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] == "<|begin_of_text|>" and tok_cfg["model_max_length"] == 128
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = tok.encode("the king and the queen", bos=True)
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids) :]
    ours = Llama3.from_pretrained(str(trained_run["run"]), dtype="float32")
    seq = list(ids)
    for _ in range(len(theirs)):
        seq.append(int(np.argmax(np.asarray(ours.logits([seq]))[0, -1])))
    assert len(theirs) >= 1 and seq[len(ids) :] == theirs.tolist()


# ------------------------------------------------------------------------- 4. full disk, tokenizer
def _enospc(*a, **k):
    raise OSError(28, "No space left on device")


def test_tokenizer_train_on_a_full_disk_is_one_line_and_leaves_nothing(
    corpus, tmp_path, monkeypatch, capsys
):
    """Before: a raw traceback and a `.tmp` file left in the output directory. The disk fills
    as the model file is flushed (mocked: a tmpfs needs root)."""
    from llama_jax import atomic, cli

    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"the previous model")
    monkeypatch.setattr(atomic.os, "fsync", _enospc)
    src = os.path.join(os.path.dirname(corpus["data"]), "all.txt")
    argv = ["tokenizer", "train", "--input", src, "--vocab_size", "400", "--output", str(out)]
    t0 = time.perf_counter()
    assert cli.main(argv) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith("error: No space left on device writing "), line
    assert "free some space" in line and time.perf_counter() - t0 < 60
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == b"the previous model"


def test_trainer_tokenizer_on_a_full_disk_leaves_no_corpus_or_tmp(corpus, tmp_path, monkeypatch):
    from llama_jax.training import data as train_data

    def half_then_full(corpus_file, vocab_size, out_dir, seed):
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
            f.write(b"half")
        _enospc()

    monkeypatch.setattr(train_data, "_train_tokenizer", half_then_full)
    c = tiny_config(corpus, tmp_path / "run")
    c.tokenizer_path = ""
    c.tokenizer_vocab_size = 400
    c.cache_dir = str(tmp_path / "cache")
    with pytest.raises(OSError, match="No space left"):
        trainer.train(c)
    assert not [p for p in (tmp_path / "run").iterdir() if "tokenizer" in p.name]
