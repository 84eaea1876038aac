"""A model's own chat template: jinja2, rendered the way transformers' `apply_chat_template` does.

Where the template comes from (`read_template_files`, beside the tokenizer file):
  - `chat_template.jinja` (what transformers >= 4.50 writes),
  - `tokenizer_config.json`'s `chat_template`: a string, or a list of {"name", "template"}
    from which the one named "default" is taken,
  - a GGUF's `tokenizer.chat_template` (set by the GGUF tokenizer),
  - `--chat_template FILE` on the command line, which overrides any of them.
A tokenizer without one uses the built-in Llama 3 format (`tokenizer/chat.py`).

Rendering matches transformers: a sandboxed environment with `trim_blocks` / `lstrip_blocks`,
the `loopcontrols` extension, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII
text, `bos_token` / `eos_token`, `add_generation_prompt`, `continue_final_message`, `tools` and
`documents`, and `{% generation %}` blocks that mark what the assistant writes.

The one deliberate difference: special-token text inside the caller's strings (message
contents, tools, documents) stays plain text, so a user who types `<|im_end|>` cannot end a turn
or forge one. transformers' default `apply_chat_template(tokenize=True)` would turn it into the
special token; its `sanitize_control_tokens=True` does what we do. The caller's special-token
text is wrapped in private-use markers before rendering; after rendering, marked text is
encoded as plain text and only the special tokens the template wrote itself become special ids.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("llama_jax.tokenizer")

# Private-use characters that never reach the tokenizer: removed from the caller's strings
# first, so they cannot be forged.
_MARK_START, _MARK_END = "\ue000", "\ue001"  # around special-token text typed by the caller
_GEN_START, _GEN_END = "\ue002", "\ue003"  # around the output of a {% generation %} block
_CONTINUE = "\ue004"  # end of the final message, for continue_final_message
_PRIVATE = re.compile(f"[{_MARK_START}{_MARK_END}{_GEN_START}{_GEN_END}{_CONTINUE}]")
_HAS_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")

TEMPLATE_FILE = "chat_template.jinja"
TRAIN_ON = ("assistant", "last", "all")


# ----------------------------------------------------------------------------- template files
def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a token as a string or as an AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any, where: Path) -> str | None:
    # A string, or a list of {"name", "template"} from which "default" is taken.
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            log.warning(
                "%s: chat templates %s, none named 'default'; using the built-in Llama 3 format "
                "(pass --chat_template FILE to choose)",
                where,
                sorted(map(str, named)),
            )
        value = named.get("default")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_template_files(directory: str | Path) -> dict[str, Any]:
    """The chat settings a Hugging Face tokenizer directory carries.

    Args:
      directory: the folder of the tokenizer file.

    Returns:
      {"chat_template": str | None, "bos_token": str | None, "eos_token": str | None,
      "eos_token_ids": [int, ...]} from `chat_template.jinja`, `tokenizer_config.json` and
      `generation_config.json` (missing files leave these defaults).
    """
    directory = Path(directory)
    out: dict[str, Any] = {
        "chat_template": None,
        "bos_token": None,
        "eos_token": None,
        "eos_token_ids": [],
    }
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        out["bos_token"] = _token_text(config.get("bos_token"))
        out["eos_token"] = _token_text(config.get("eos_token"))
        out["chat_template"] = _pick_template(config.get("chat_template"), config_path)
    if (directory / TEMPLATE_FILE).is_file():
        out["chat_template"] = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():
        eos = _read_json(gen_path).get("eos_token_id")
        if eos is not None:
            out["eos_token_ids"] = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return out


def read_template_file(path: str | Path) -> str:
    """The text of a `--chat_template FILE`: a jinja2 file, or a JSON file with `chat_template`.

    Raises:
      FileNotFoundError / ValueError (one line) for a missing file, a JSON file without a
      template, or a template that does not compile.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"--chat_template {path}: no such file; give a jinja2 template file (e.g. "
            "chat_template.jinja) or a tokenizer_config.json with a chat_template"
        )
    if path.suffix == ".json":
        text = _pick_template(_read_json(path).get("chat_template"), path)
        if text is None:
            raise ValueError(f"--chat_template {path}: the JSON file has no 'chat_template'")
    else:
        text = path.read_text(encoding="utf-8")
    compile_template(text)  # a clear error now, not at the first dialog
    return text


# ----------------------------------------------------------------------------- jinja2
@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> Any:
    """The compiled template; a one-line ValueError when it does not compile.

    Args:
      source: jinja2 template text.
    """
    import jinja2  # deferred: jinja2 is needed only by models that carry a template
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # {% generation %}...{% endgeneration %}: what the assistant writes, for loss masks.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_mark")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _mark(self, caller: Any) -> str:
            return f"{_GEN_START}{caller()}{_GEN_END}"

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
        sort_keys: bool = False,
    ) -> str:  # fmt: skip
        # jinja2's own tojson escapes HTML characters and non-ASCII text; templates expect not.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile (line {e.lineno}): {e.message}") from None
    except jinja2.TemplateError as e:  # e.g. an unknown filter
        raise ValueError(f"chat template does not compile: {e}") from None


def has_generation_blocks(source: str) -> bool:
    """Whether the template marks the assistant's text with {% generation %} blocks."""
    return bool(_HAS_GENERATION.search(source))


def _mark(obj: Any, pattern: re.Pattern[str] | None) -> Any:
    # The caller's strings: private-use markers dropped, special-token text wrapped in markers.
    if isinstance(obj, str):
        obj = _PRIVATE.sub("", obj)
        if pattern is None:
            return obj
        return pattern.sub(lambda m: f"{_MARK_START}{m.group()}{_MARK_END}", obj)
    if isinstance(obj, Mapping):
        return {k: _mark(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, pattern) for v in obj]
    return obj


@functools.lru_cache(maxsize=64)
def _alternation(tokens: frozenset[str]) -> str:
    # Longest first, so a token that is a prefix of another cannot shadow it.
    return "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))


def render_text(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    tools: Sequence[Any] | None = None,
    documents: Sequence[Any] | None = None,
    control_tokens: Collection[str] = (),
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The template's text for a dialog, with the private-use markers still in it.

    Args:
      source: the jinja2 template.
      messages: [{"role", "content", ...}, ...], passed to the template as they are.
      bos_token, eos_token: the strings the template sees.
      add_generation_prompt: end with the opening of an assistant turn.
      continue_final_message: end inside the final message (for the model to continue it).
      tools, documents: passed to the template.
      control_tokens: special-token texts to keep plain where they occur in the caller's strings.
      template_kwargs: further variables for the template (e.g. date_string).

    Returns:
      The rendered text (markers included; `encode_rendered` reads them).
    """
    import jinja2

    if add_generation_prompt and continue_final_message:
        raise ValueError(
            "add_generation_prompt and continue_final_message cannot both be set: the first "
            "opens a new assistant turn, the second continues the last message"
        )
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    pattern = re.compile(_alternation(frozenset(control_tokens))) if control_tokens else None
    chat = _mark([dict(m) for m in messages], pattern)
    if continue_final_message:
        if not chat or not isinstance(chat[-1].get("content"), str):
            raise ValueError("continue_final_message needs a final message with a str content")
        # A space after the tag shows whether the template trims the content.
        chat[-1]["content"] += _CONTINUE + " "
    template = compile_template(source)
    try:
        text = template.render(
            messages=chat,
            tools=_mark(tools, pattern),
            documents=_mark(documents, pattern),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **dict(template_kwargs or {}),
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template refused the dialog: {e}") from None
    if continue_final_message:
        at = text.rfind(_CONTINUE)
        if at < 0:
            raise ValueError(
                "continue_final_message: the chat template drops the end of the final message, "
                "so it cannot be continued"
            )
        trimmed = not text.startswith(_CONTINUE + " ", at)
        text = text[:at].rstrip() if trimmed else text[:at]
    return text


# ----------------------------------------------------------------------------- text -> ids
def encode_rendered(
    tok: Any, text: str, *, with_generation: bool = False
) -> tuple[list[int], list[int] | None]:
    """Ids of rendered template text: special ids only where the template wrote the token.

    Args:
      tok: a `Tokenizer`.
      text: `render_text`'s output.
      with_generation: also return which ids came from {% generation %} blocks.

    Returns:
      (ids, mask): mask[i] is 1 for the ids whose bytes overlap a generation block (None
      unless with_generation).
    """
    specials = _alternation(frozenset(tok.special_tokens))
    parts = [
        f"(?P<gen>[{_GEN_START}{_GEN_END}])",
        f"{_MARK_START}(?P<marked>{specials}){_MARK_END}" if specials else None,
        f"(?P<lone>[{_MARK_START}{_MARK_END}])",
        f"(?P<special>{specials})" if specials else None,
    ]
    regex = re.compile("|".join(p for p in parts if p))
    pieces: list[str | int] = []  # text to encode as plain text, or a special id
    buffer: list[str] = []
    gen_bounds: list[int] = []  # byte offsets of generation starts / ends, alternating
    offset = 0  # bytes of output so far

    def flush() -> None:
        if buffer:
            pieces.append("".join(buffer))
            buffer.clear()

    def emit(piece: str) -> None:
        nonlocal offset
        buffer.append(piece)
        offset += len(piece.encode("utf-8", "surrogatepass"))

    start = 0
    for m in regex.finditer(text):
        emit(text[start : m.start()])
        start = m.end()
        if m.group("gen"):
            opening = m.group("gen") == _GEN_START
            if opening != (len(gen_bounds) % 2 == 0):
                raise ValueError("chat template: {% generation %} blocks are nested")
            gen_bounds.append(offset)
        elif m.group("lone"):
            flush()  # a marker split by the template still keeps text apart
        elif m.group("marked"):
            flush()
            emit(m.group("marked"))
            flush()  # encoded apart, as transformers' sanitize_control_tokens encodes it
        else:
            flush()
            pieces.append(tok.special_tokens[m.group("special")])
            offset += len(m.group("special").encode("utf-8"))
    emit(text[start:])
    flush()
    ids: list[int] = []
    ends: list[int] = []  # byte offset where each id ends
    at = 0
    for piece in pieces:
        new = [piece] if isinstance(piece, int) else tok._encode_ordinary(piece)
        ids += new
        if with_generation:
            for i in new:
                at += len(tok.decode_bytes([i]))
                ends.append(at)
    if not with_generation:
        return ids, None
    if at != offset:
        raise ValueError(
            f"{tok.path}: {{% generation %}} masks need a tokenizer whose tokens spell the text "
            "byte for byte (byte-level BPE); use a template without generation blocks"
        )
    spans = list(zip(gen_bounds[::2], gen_bounds[1::2]))
    mask = []
    for k, end in enumerate(ends):
        begin = ends[k - 1] if k else 0
        mask.append(int(any(begin < e and end > s for s, e in spans)))
    return ids, mask


# ----------------------------------------------------------------------------- loss masks
def _first_difference(tok: Any, part: list[int], whole: list[int]) -> str:
    j = next((j for j, (a, b) in enumerate(zip(part, whole)) if a != b), len(whole))
    got = repr(tok.decode([part[j]])) if j < len(part) else "the end"
    want = repr(tok.decode([whole[j]])) if j < len(whole) else "the end"
    return f"token {j} is {got} there but {want} in the whole dialog"


def _end_of_turn(stop_ids: Collection[int], ids: list[int], start: int, stop: int) -> int:
    # The span ends with the turn's end token: template text after it (ChatML's "\n") is not
    # something the model has to say.
    for j in range(stop - 1, start - 1, -1):
        if ids[j] in stop_ids:
            return j + 1
    return stop


def template_mask(
    tok: Any, messages: Sequence[Mapping[str, Any]], train_on: str
) -> tuple[list[int], list[int]]:
    """(ids, mask) of a dialog under the tokenizer's chat template; mask 1 on targets.

    The assistant spans come from {% generation %} blocks when the template has them,
    otherwise from rendering the dialog up to each assistant turn: those ids must be a prefix of
    the whole dialog's ids, or the template is refused with the turn and the first differing
    token. A span ends after the turn's end-of-turn token (a stop id).

    Args:
      tok: a `Tokenizer` with `chat_template` set.
      messages: the dialog.
      train_on: "assistant" (every assistant turn), "last" (the last one), "all" (every token).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}; valid: {', '.join(TRAIN_ON)}")
    if train_on == "all":
        ids = tok.encode_dialog(messages, add_generation_prompt=False)
        return ids, [1] * len(ids)
    if has_generation_blocks(tok.chat_template):
        ids, mask = tok._encode_template(messages, False, with_generation=True)
        if train_on == "last":
            runs = [j for j in range(len(mask)) if mask[j] and (j == 0 or not mask[j - 1])]
            mask = [0] * runs[-1] + mask[runs[-1] :] if runs else mask
        return ids, mask
    ids = tok.encode_dialog(messages, add_generation_prompt=False)
    turns = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
    mask = [0] * len(ids)
    for k in turns[-1:] if train_on == "last" else turns:
        before = tok.encode_dialog(messages[:k], add_generation_prompt=True)
        through = tok.encode_dialog(messages[: k + 1], add_generation_prompt=False)
        for part in (before, through):
            if ids[: len(part)] != part:
                raise ValueError(
                    f"chat template: the dialog rendered up to turn {k} (assistant) is not a "
                    f"prefix of the whole dialog ({_first_difference(tok, part, ids)}), so no "
                    "loss mask can be cut from it; use a template with {% generation %} blocks "
                    "or train_on=all"
                )
        stop = _end_of_turn(tok.stop_ids, ids, len(before), len(through))
        mask[len(before) : stop] = [1] * (stop - len(before))
    return ids, mask
