"""Issue 9's defects, each as a regression test: the seed's command line, NaN and corrupt
checkpoints, counts out of range, nothing written before the checks, one-line errors."""

import json
import os
import shlex
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from poison import poisoned_batch
from test_train import WORDS, assert_trees_equal, corpus, final_state, losses, tiny_config

from llama_jax import cli
from llama_jax.data import make_eval_iterator, make_train_iterator
from llama_jax.formats import checkpoint
from llama_jax.training import experiment, trainer
from llama_jax.training.data import data_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prose(n_paragraphs, seed=0):
    rng = np.random.RandomState(seed)
    paras = []
    for _ in range(n_paragraphs):
        lines = [
            " ".join(rng.choice(WORDS, rng.randint(4, 12))).capitalize() + "."
            for _ in range(rng.randint(2, 6))
        ]
        paras.append("\n".join(lines))
    return "\n\n".join(paras) + "\n"


def _run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- 1. the seed CLI
def test_the_seeds_command_line_works_as_written(tmp_path, monkeypatch, capsys):
    """`llama3 train` with the seed's flags and no --config, on the user's own text files."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text(_prose(60, seed=1))
    (data / "valid.txt").write_text(_prose(8, seed=2))
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(
        "train --data_path data/train.txt --valid_data_path data/valid.txt --model_path model "
        "--num_gpus 1 --batch_size 8 --learning_rate 0.0001 --num_epochs 3"
    )
    # Keep the default model's shape but not its cost: the test is about the command line.
    argv += ["--config.model.n_layers=1", "--config.seq_len=64", "--config.peak_flops=1e11"]
    code, out, err = _run_cli(argv, capsys)
    assert code == 0, err[-3000:]
    with open("model/experiment.json") as f:
        saved = json.load(f)
    assert (saved["num_epochs"], saved["num_steps"], saved["num_devices"]) == (3, 0, 1)
    assert saved["valid_data_path"] == "data/valid.txt"
    # Three epochs of the training file, validated on the whole of valid.txt.
    assert "valid_loss" in out and "step=" in out
    with open("model/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    valid = [r for r in rows if "valid_loss" in r]
    assert valid and valid[-1]["valid_tokens"] > 0
    assert os.path.isfile("model/tokenizer.model")  # trained on the data, in the run dir


def test_no_validation_given_holds_out_a_slice(tmp_path):
    c = experiment.default_config()
    c.data_path = str(tmp_path / "train.txt")
    assert data_splits(c) == ("train[:95%]", "train[95%:]")
    c.valid_fraction = 0.0
    assert data_splits(c) == ("train", None)
    c.valid_data_path = str(tmp_path / "valid.txt")
    assert data_splits(c) == ("train", "train")


class _ByteTokenizer:
    """A tiny independent tokenizer: one id per UTF-8 byte (+ BOS/EOS)."""

    vocab_size, bos_id, eos_id, pad_id = 258, 256, 257, None

    def encode_batch(self, texts, **kw):
        return [list(t.encode()) for t in texts]

    fingerprint = "bytes-v1"


@pytest.mark.parametrize("text_unit, n_docs", [("document", 1), ("paragraph", 40), ("line", None)])
def test_text_units_and_holdout(tmp_path, text_unit, n_docs):
    text = _prose(40, seed=3)
    path = tmp_path / "one.txt"
    path.write_text(text)
    kw = dict(seq_len=32, global_batch_size=1, add_bos=False, add_eos=False, mesh=None)
    kw.update(cache_dir=str(tmp_path / "cache"), text_unit=text_unit)
    kw.update(process_index=0, process_count=1)

    def tokens(split):
        it = make_eval_iterator(str(path), _ByteTokenizer(), split=split, **kw)
        return [int(b["loss_mask"].sum()) for b in it]

    whole, head, tail = sum(tokens("train")), sum(tokens("train[:90%]")), sum(tokens("train[90%:]"))
    # Targets (loss_mask) per document are its tokens - 1: cutting one document by tokens
    # loses the one target across the cut, splitting by documents loses none.
    assert head + tail == whole - (n_docs == 1) and head > 0 and tail > 0
    if n_docs == 1:  # one document: held out by tokens, 10% of them
        assert abs(tail - 0.1 * whole) <= 1
    lines = [ln for ln in text.split("\n") if ln.strip()]
    expected_docs = {"document": 1, "paragraph": 40, "line": len(lines)}[text_unit]
    it = make_train_iterator(str(path), _ByteTokenizer(), split="train", seed=0, **kw)
    assert it.get_state() is not None
    # Each document is packed alone: count the documents over one epoch, in corpus order. A
    # segment starts a document unless it continues the previous row's last one (a piece cut
    # at the row boundary, whose prediction across the cut the previous row keeps).
    documents, prev_last_mask = 0, 0.0
    it = make_eval_iterator(str(path), _ByteTokenizer(), split="train", **kw)
    for b in it:
        seg = np.asarray(b["segment_ids"])[0]
        pos = np.asarray(b["positions"])[0]
        starts = (pos == 0) & (seg > 0)
        starts[0] &= prev_last_mask == 0
        documents += int(starts.sum())
        prev_last_mask = float(np.asarray(b["loss_mask"])[0, -1])
    assert documents == expected_docs


# ----------------------------------------------------------------------------- 2. flags win
def test_num_epochs_flag_wins_over_the_files_num_steps():
    c = experiment.load_config(os.path.join(ROOT, "experiments", "shakespeare_tiny.py"))
    assert c.num_steps == 250
    experiment.parse_overrides(c, ["--num_epochs", "3"])
    assert (c.num_steps, c.num_epochs) == (0, 3)
    c = experiment.load_config(os.path.join(ROOT, "experiments", "shakespeare_tiny.py"))
    with pytest.raises(ValueError, match="both num_steps=7 and num_epochs=3 were given"):
        experiment.parse_overrides(c, ["--num_epochs=3", "--config.num_steps=7"])


# ----------------------------------------------------------------------------- 3. NaN abort
def test_nan_abort_saves_nothing_at_or_after_the_bad_step(corpus, tmp_path):
    run = tmp_path / "run"
    # Step 3 -> 4 is poisoned; a checkpoint is due after every step.
    c = tiny_config(corpus, run, num_steps=8, checkpoint_every=1, nan_policy="abort")
    message = "step from 3 to 4 gave a non-finite.*the newest checkpoint, step 3, is intact"
    with poisoned_batch(at=3), pytest.raises(trainer.NonFiniteLossError, match=message):
        trainer.train(c)
    assert checkpoint.committed_steps(str(run / "checkpoints"))[-1] == 3
    # A rerun resumes from step 3 and stops at the same step again, saving nothing new.
    with poisoned_batch(at=3), pytest.raises(trainer.NonFiniteLossError, match=message):
        trainer.train(c)
    assert checkpoint.committed_steps(str(run / "checkpoints"))[-1] == 3


# ----------------------------------------------------------------------------- 4. corruption
def test_fingerprint_sees_one_flipped_bit_and_not_the_mesh():
    x = np.random.RandomState(0).randn(64, 48).astype(np.float32)
    tree = {"a": x, "b": {"c": np.arange(10, dtype=np.int32)}}
    ref = checkpoint.state_fingerprint(jax.tree.map(jnp.asarray, tree))
    mesh = jax.make_mesh((8,), ("x",))
    sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P("x")))
    assert checkpoint.state_fingerprint({**tree, "a": sharded}) == ref
    flipped = x.copy()
    flipped.view(np.uint32)[17, 5] ^= 1 << 3
    assert checkpoint.verification_problem({**tree, "a": flipped}, ref) is not None
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert "fingerprint" in checkpoint.verification_problem({**tree, "a": swapped}, ref)
    nan = x.copy()
    nan[3, 3] = np.nan
    assert "non-finite" in checkpoint.verification_problem({**tree, "a": nan}, None)


def _biggest_file(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_newest_checkpoint_falls_back_and_ends_bitwise_equal(corpus, tmp_path, damage):
    ref, run = tmp_path / "ref", tmp_path / "run"
    trainer.train(tiny_config(corpus, ref, num_steps=6, checkpoint_every=2))
    trainer.train(tiny_config(corpus, run, num_steps=6, checkpoint_every=2, debug_stop_after=4))
    assert checkpoint.committed_steps(str(run / "checkpoints")) == [2, 4]
    victim = _biggest_file(run / "checkpoints" / "4" / "state")
    if damage == "flip":
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x55]))
    else:
        os.truncate(victim, os.path.getsize(victim) // 3)
    trainer.train(tiny_config(corpus, run, num_steps=6, checkpoint_every=2))
    with open(run / "train.log") as f:  # the run's log: one line per failed checkpoint
        errors = [line for line in f if " ERROR " in line]
    assert len(errors) == 1, errors
    assert "checkpoint step 4 " in errors[0] and "falling back to step 2" in errors[0]
    moved = [n for n in os.listdir(run / "checkpoints") if n.startswith("4.corrupt-")]
    assert moved, os.listdir(run / "checkpoints")
    assert_trees_equal(final_state(str(run))[1], final_state(str(ref))[1])
    assert {s: v for s, v in losses(str(run)).items() if s > 2} == {
        s: v for s, v in losses(str(ref)).items() if s > 2
    }


def test_non_finite_updates_never_reach_a_checkpoint(corpus, tmp_path):
    """A huge learning rate overflows the update (not the loss or gradient): skip keeps the
    state finite and every checkpoint verifies."""
    run = tmp_path / "run"
    c = tiny_config(
        corpus, run, num_steps=4, checkpoint_every=2, nan_policy="skip", learning_rate=1e38
    )
    c.warmup_steps = 0
    c.grad_clip = 0.0
    trainer.train(c)
    for step in checkpoint.committed_steps(str(run / "checkpoints")):
        state = checkpoint.load_params(str(run / "checkpoints" / str(step) / "state"))
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype.kind == "f")


# ----------------------------------------------------------------------------- 5. counts
@pytest.mark.parametrize(
    "flag, message",
    [
        ("--num_gpus=-1", "--num_gpus=-1: must be an integer >= 0; 0 = all devices"),
        ("--config.checkpoint_every=-5", "checkpoint_every=-5: must be an integer >= 0"),
        ("--config.log_every=0", "--config.log_every=0: must be an integer >= 1"),
        ("--batch_size=0", "--batch_size=0: must be an integer >= 1"),
        ("--config.keep_checkpoints=0", "keep_checkpoints=0: must be an integer >= 1"),
        ("--learning_rate=0", "--learning_rate=0.0: must be > 0"),
        ("--config.text_unit=sentence", "text_unit='sentence'; valid: document, paragraph"),
    ],
)
def test_counts_out_of_range_are_one_line_errors(tmp_path, capsys, flag, message):
    exp = os.path.join(ROOT, "experiments", "shakespeare_tiny.py") + ":runlocal"
    code, _, err = _run_cli(["train", "--config", exp, flag, f"--model_path={tmp_path}/r"], capsys)
    assert code == 1
    assert message in _error_line(err)
    assert not os.path.exists(tmp_path / "r")


def test_checkpoint_every_0_means_only_the_final_checkpoint(corpus, tmp_path):
    trainer.train(tiny_config(corpus, tmp_path / "run", num_steps=3, checkpoint_every=0))
    assert checkpoint.committed_steps(str(tmp_path / "run" / "checkpoints")) == [3]


# ----------------------------------------------------------------------------- 6. no writes
def test_refused_run_writes_nothing(corpus, tmp_path):
    run = tmp_path / "run"
    trainer.train(tiny_config(corpus, run, num_steps=1))
    os.remove(run / "config.json")
    before = sorted(os.listdir(run))
    with pytest.raises(ValueError, match="its checkpoint of step 1.*'n_layers': \\(2, 3\\)"):
        trainer.train(tiny_config(corpus, run, **{"model.n_layers": 3}))
    assert sorted(os.listdir(run)) == before


# ----------------------------------------------------------------------------- 7. errors
def test_misspelt_key_and_wrong_type_are_one_line_errors(tmp_path, capsys):
    exp = os.path.join(ROOT, "experiments", "shakespeare_tiny.py")
    code, _, err = _run_cli(["train", "--config", exp, "--config.modle.n_layers=2"], capsys)
    assert code == 1 and "did you mean model.n_layers" in _error_line(err)
    code, _, err = _run_cli(["train", "--config", exp, "--config.lerning_rate=1"], capsys)
    assert code == 1 and "did you mean learning_rate" in _error_line(err)
    code, _, err = _run_cli(["train", "--config", exp, "--config.seq_len=long"], capsys)
    assert code == 1 and "--config.seq_len='long'; valid: an integer" in _error_line(err)
    code, _, err = _run_cli(
        ["train", "--config", exp, "--config.seq_len=long", "--verbose"], capsys
    )
    assert code == 1 and "Traceback" in err


def test_convert_errors_are_one_line(tmp_path, capsys):
    code, _, err = _run_cli(["convert", "--input", str(tmp_path / "nope"), "--output", "o"], capsys)
    assert code == 1 and "does not exist" in _error_line(err)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unsafe_pickle_is_refused(tmp_path, capsys):
    meta = tmp_path / "meta"
    meta.mkdir()
    params = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 128}
    params.update(multiple_of=32, ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=5e5)
    (meta / "params.json").write_text(json.dumps(params))
    import torch

    torch.save({"tok_embeddings.weight": _Evil()}, meta / "consolidated.00.pth")
    code, out, err = _run_cli(
        ["convert", "--input", str(meta), "--output", str(tmp_path / "o")], capsys
    )
    assert code == 1 and "refused an unsafe pickle" in _error_line(err)
    assert "pwned" not in out


def test_disk_full_names_the_cause(corpus, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        c = tiny_config(corpus, mnt / "run", num_steps=40, checkpoint_every=1)
        c.cache_dir = str(tmp_path / "cache")
        c.keep_checkpoints = 100
        with pytest.raises(checkpoint.CheckpointError) as e:
            trainer.train(c)
        msg = str(e.value)
        assert "No space left on device while saving step" in msg and "\n" not in msg
        intact = msg.split("newest intact checkpoint is step ")[1].split(" ")[0]
        # the named step is the newest that verifies (a committed step may not: issue 23)
        ckpts = str(mnt / "run" / "checkpoints")
        assert checkpoint.load_verified_params(ckpts)[0] == int(intact)
    finally:
        subprocess.run(["umount", str(mnt)])


def test_prompt_over_the_context_names_truncate(tmp_path, capsys):
    from llama_jax import Llama3
    from llama_jax.model.config import get_config
    from llama_jax.model.transformer import init_params

    cfg = get_config("tiny", vocab_size=400, max_seq_len=32)
    from llama_jax.tokenizer.train import train_tokenizer

    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text(_prose(50))
    tok = train_tokenizer(str(corpus_file), 400, str(tmp_path / "tok"), show_progress=False)
    params = jax.device_get(init_params(cfg, jax.random.key(0)))
    import flax.linen as nn

    model = Llama3(config=cfg, params=nn.unbox(params), tokenizer=tok, dtype="float32")
    model.save_pretrained(str(tmp_path / "m"))
    tok.save(str(tmp_path / "m"))
    long_prompt = " ".join(["the king"] * 40)
    argv = ["generate", "--model_path", str(tmp_path / "m"), "--max_new_tokens", "4", long_prompt]
    code, _, err = _run_cli(argv, capsys)
    assert code == 1 and "--truncate" in _error_line(err)
    code, out, err = _run_cli(argv + ["--truncate"], capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------- 8. defaults
def test_run_dir_loads_in_its_own_dtype_and_cli_samples_like_meta(corpus, tmp_path):
    from llama_jax import Llama3

    run = tmp_path / "run"
    trainer.train(tiny_config(corpus, run, num_steps=1))
    model = Llama3.from_pretrained(str(run))
    assert model.config.param_dtype == "float32"
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model.params))
    args = cli._sampling_parser("t", "").parse_args(["--model_path", "x"])
    assert (args.temperature, args.top_p, args.dtype) == (0.6, 0.9, "auto")


# ----------------------------------------------------------------------------- 11. signals
def test_sigterm_before_the_loop_saves_and_returns(corpus, tmp_path, monkeypatch):
    real = trainer.make_data

    def make_data_then_sigterm(*a, **k):
        out = real(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(trainer, "make_data", make_data_then_sigterm)
    result = trainer.train(tiny_config(corpus, tmp_path / "run", num_steps=5))
    assert result["step"] == 0
    assert checkpoint.committed_steps(str(tmp_path / "run" / "checkpoints")) == [0]


KILLED_BUILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
from llama_jax.data import sources, tokens
from test_hardening import _ByteTokenizer

real = tokens._encoder

def killing_encoder(*args, **kwargs):
    _, n = real(*args, **kwargs)
    return (lambda *a, **k: os.kill(os.getpid(), 9)), n

tokens._encoder = killing_encoder
source = sources.open_source(sys.argv[2], split="train")
tokens.load_or_build(source, _ByteTokenizer(), cache_dir=sys.argv[3])
"""


def test_killed_token_cache_build_leaves_nothing_behind(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(_prose(30))
    cache = tmp_path / "cache"
    script = tmp_path / "killed_build.py"
    script.write_text(KILLED_BUILD)
    args = [sys.executable, str(script), os.path.join(ROOT, "tests"), str(path), str(cache)]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert any(n.startswith(".tmp-") for n in os.listdir(cache))
    from llama_jax.data import sources, tokens

    tokens.load_or_build(
        sources.open_source(str(path), split="train"), _ByteTokenizer(), cache_dir=str(cache)
    )
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp-")], os.listdir(cache)


def test_default_experiment_warms_up_over_5_percent_of_its_steps():
    c = experiment.default_config()
    c.learning_rate = 1e-3
    _, schedule = trainer.make_tx(c, 200)  # 5% of 200: 10 warmup steps
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)


def test_sampling_never_draws_ids_the_tokenizer_cannot_decode(tmp_path):
    """A model vocabulary larger than its tokenizer's (the default experiment on a small
    corpus, whose trained tokenizer has fewer ids than asked): ids past the tokenizer's never
    come out, so the text decodes."""
    import flax.linen as nn

    from llama_jax import Llama3
    from llama_jax.model.config import get_config
    from llama_jax.model.transformer import init_params
    from llama_jax.tokenizer.train import train_tokenizer

    (tmp_path / "c.txt").write_text(_prose(50))
    tok = train_tokenizer(str(tmp_path / "c.txt"), 400, str(tmp_path / "tok"), show_progress=False)
    cfg = get_config("tiny", vocab_size=600, max_seq_len=64)
    params = nn.unbox(jax.device_get(init_params(cfg, jax.random.key(0))))
    model = Llama3(config=cfg, params=params, tokenizer=tok, dtype="float32")
    ids = model.generate_ids([[tok.bos_id]] * 4, max_new_tokens=40, temperature=1.0, seed=3)
    assert max(max(row) for row in ids) < 400
    assert isinstance(model.generate("the king", max_new_tokens=20, temperature=1.0), str)
