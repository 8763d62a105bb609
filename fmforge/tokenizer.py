"""Byte-level BPE tokenizer: training, loading/saving, special tokens and the chat template.

The tokenizer is a thin wrapper around a Hugging Face `tokenizers.Tokenizer` (the Rust library), saved in
the same two files Hugging Face uses, so `transformers.AutoTokenizer.from_pretrained(directory)` loads it:

    tokenizer.json          the tokenizer itself (pre-tokenizer, BPE vocab + merges, added special tokens)
    tokenizer_config.json   which special token is bos/eos/pad, whether a prompt starts with bos
                            (add_bos_token), the chat template, model_max_length

Whether bos is prepended: `add_bos_token` in tokenizer_config.json (fmforge writes it: true for its own tokenizers;
for an imported one, whether the source's tokenizer adds bos), else what tokenizer.json's post-processor adds,
as transformers 5 decides (Llama 3's TemplateProcessing "<|begin_of_text|> $A" adds bos; no post-processor, none).

Byte-level BPE (GPT-2 style) maps every byte to a symbol first, so there is no unknown token and
`decode(encode(text)) == text` for any Unicode string.

Special tokens in plain text: `encode(text)` treats a string such as "<|eos|>" inside `text` as ordinary
characters (it is split into normal BPE pieces), so a document that happens to contain a marker cannot
inject control tokens into training data or a prompt. Pass `allow_special=True` to turn marker strings into
their special ids, e.g. when encoding the output of `apply_chat_template`. Note that Hugging Face's
`AutoTokenizer` always matches special tokens in text, i.e. it behaves like `allow_special=True`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fmforge.errors import TokenizerError
from fmforge.fileio import atomic_write_text

# Ids 0.. in this order. New markers take a reserved slot so existing ids never move.
SPECIAL_TOKENS: list[str] = [
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|image|>",
    "<|/image|>",
    "<|audio|>",
    "<|/audio|>",
    "<|mask|>",  # the masked-language-modelling input (model.objective mlm); was <|reserved_0|>
    *[f"<|reserved_{i}|>" for i in range(1, 5)],
]
MASK_TOKEN = "<|mask|>"

CHAT_ROLES = ("system", "user", "assistant")

# Hugging Face compatible (transformers passes `messages`, `bos_token`, `add_generation_prompt` and
# `raise_exception`). Written on one line so trim_blocks/lstrip_blocks settings cannot change the output.
CHAT_TEMPLATE: str = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


# Tokens that close a chat turn in the templates of the model families fmforge imports.
MEDIA_MARK = "\ue002"  # stands for an encoded media part (a list of ids) while the chat template renders

CHAT_END_TOKENS = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<|end_of_turn|>")


class Tokenizer:
    """A byte-level BPE tokenizer plus the names of its bos/eos/pad tokens and its chat template."""

    def __init__(
        self,
        rust_tokenizer: RustTokenizer,
        *,
        bos_token: str | None = "<|bos|>",
        eos_token: str = "<|eos|>",
        pad_token: str | None = "<|pad|>",
        chat_template: str = CHAT_TEMPLATE,
        model_max_length: int | None = None,
        add_bos_token: bool = True,
    ):
        # Two views of the same tokenizer: `_special` matches special-token strings in text, `_plain` does not.
        json_str = rust_tokenizer.to_str()
        self._special = RustTokenizer.from_str(json_str)
        self._special.encode_special_tokens = False
        self._plain = RustTokenizer.from_str(json_str)
        self._plain.encode_special_tokens = True
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        # Some families have no bos token (Qwen2/Qwen3 write "bos_token": null); then nothing is prepended.
        self.bos_id = self.token_id(bos_token) if bos_token is not None else None
        # Whether a prompt or document starts with bos (encode(add_bos=True), shards).
        self.add_bos_token = add_bos_token and self.bos_id is not None
        self.eos_id = self.token_id(eos_token)
        self.pad_id = self.token_id(self.pad_token)

    # ---- persistence -------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read tokenizer.json and tokenizer_config.json from `directory`."""
        directory = Path(directory)
        tokenizer_path, config_path = directory / TOKENIZER_FILE, directory / CONFIG_FILE
        for path in (tokenizer_path, config_path):
            if not path.is_file():
                raise TokenizerError(f"{path} not found — train a tokenizer (`fmforge tokenizer`) or point to a "
                                     "directory that has one")
        try:
            rust_tokenizer = RustTokenizer.from_str(tokenizer_path.read_text(encoding="utf-8"))
        except Exception as error:  # tokenizers raises a plain Exception on bad JSON
            raise TokenizerError(f"{tokenizer_path} is corrupt ({_first_line(error)}) — re-create it") from None
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as error:
            raise TokenizerError(f"{config_path} is corrupt ({_first_line(error)}) — re-create it") from None
        return cls._from_parts(rust_tokenizer, config, source=str(config_path))

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into `directory` (created if needed), atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / TOKENIZER_FILE, self._special.to_str(pretty=True))
        atomic_write_text(directory / CONFIG_FILE, json.dumps(self._hf_config(), indent=2, ensure_ascii=False))

    def __getstate__(self) -> dict:
        # Pickle (e.g. to send to worker processes) as the JSON text, not as the Rust object.
        return {"tokenizer_json": self._special.to_str(), "config": self._hf_config()}

    def __setstate__(self, state: dict) -> None:
        other = self._from_parts(RustTokenizer.from_str(state["tokenizer_json"]), state["config"], source="pickle")
        self.__dict__.update(other.__dict__)

    @classmethod
    def _from_parts(cls, rust_tokenizer: RustTokenizer, config: dict, source: str) -> Tokenizer:
        def token_name(key: str, default: str | None) -> str | None:
            value = config.get(key, default)
            if isinstance(value, dict):  # older transformers files store {"content": "<s>", ...}
                value = value.get("content")
            if value is not None and not isinstance(value, str):
                raise TokenizerError(f"{source}: '{key}' must be a string — fix or re-create the file")
            return value

        max_length = config.get("model_max_length")
        bos_token = token_name("bos_token", "<|bos|>")
        add_bos_token = config.get("add_bos_token")
        if not isinstance(add_bos_token, bool):  # not said: as transformers, whatever the post-processor adds
            add_bos_token = bos_token is not None and post_processor_prefix(rust_tokenizer) == bos_token
        try:
            return cls(
                rust_tokenizer,
                bos_token=bos_token,
                eos_token=token_name("eos_token", "<|eos|>"),
                pad_token=token_name("pad_token", None),
                chat_template=config.get("chat_template") or CHAT_TEMPLATE,
                model_max_length=max_length if isinstance(max_length, int) and max_length < 2**62 else None,
                add_bos_token=add_bos_token,
            )
        except TokenizerError as error:
            raise TokenizerError(f"{source}: {error}") from None

    def _hf_config(self) -> dict:
        """The tokenizer_config.json content, in the form transformers.AutoTokenizer reads."""
        named = {self.bos_token, self.eos_token, self.pad_token}
        extra = [token for token in self.special_tokens() if token not in named]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "additional_special_tokens": extra,
            # Documents start with bos when this is true (see data/shards.py); the chat template adds bos itself.
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "padding_side": "right",
            "chat_template": self.chat_template,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        return config

    # ---- vocabulary --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0 .. vocab_size-1)."""
        return self._special.get_vocab_size(with_added_tokens=True)

    def special_tokens(self) -> list[str]:
        """The special (added) tokens of this tokenizer, in id order."""
        decoder = self._special.get_added_tokens_decoder()
        return [decoder[i].content for i in sorted(decoder) if decoder[i].special]

    def chat_stop_ids(self) -> frozenset[int]:
        """Ids that end an assistant turn: eos and whichever end-of-turn token this tokenizer has (fmforge's
        <|end|>, Llama 3's <|eot_id|>, Qwen's <|im_end|>, Gemma's <|end_of_turn|>)."""
        ends = {self._special.token_to_id(token) for token in CHAT_END_TOKENS}
        return frozenset({self.eos_id} | ends - {None})

    def token_id(self, token: str) -> int:
        """Id of a special token such as "<|end|>"."""
        token_id = self._special.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"token {token!r} is not in this tokenizer's vocabulary — re-train the tokenizer "
                                 "or use one of its special tokens")
        return token_id

    # ---- encoding ----------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; with `allow_special`, strings like "<|end|>" become their special ids.
        `add_bos` prepends the bos id when this tokenizer starts sequences with one (add_bos_token), as
        transformers' `tokenizer(text)` does."""
        rust = self._special if allow_special else self._plain
        ids = rust.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.add_bos_token else ids

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (parallel inside the Rust library)."""
        rust = self._special if allow_special else self._plain
        return [encoding.ids for encoding in rust.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Exact inverse of `encode` for whole sequences (a cut inside a UTF-8 character
        decodes to U+FFFD)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # numpy arrays, torch tensors
        return self._special.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render a conversation ([{"role": ..., "content": ...}, ...]) as text; encode it with
        `encode(text, allow_special=True)`."""
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise TokenizerError(f"chat message {index} must be a dict with 'role' and a string 'content'")

        template = _compiled_template(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of a conversation: the template's own text becomes special ids where it names them, while
        every message's content is encoded as plain text, so a marker typed in a message (an end-of-turn, then an
        assistant role) stays text and cannot forge a turn.

        The template is rendered twice: with each content replaced by a unique placeholder (which tells the
        template's text from the contents, wherever a content's text happens to occur), and as it is (which
        tells how the template inserted each content: as is, or trimmed as Llama 3's does)."""
        messages, media = _render_media(messages)
        text = self.apply_chat_template(messages, add_generation_prompt)
        marks = [f"\ue000{index}\ue001" for index in range(len(messages))]
        shaped = self.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks)],
                                          add_generation_prompt)
        ids: list[int] = []
        cursor = 0  # in `text`
        for message, mark in zip(messages, marks):
            before, found, shaped = shaped.partition(mark)
            if not found or mark in shaped:
                raise TokenizerError("the chat template does not insert each message's content once; it cannot "
                                     "be encoded with contents kept as text")
            if not text.startswith(before, cursor):
                raise TokenizerError("the chat template renders differently from one conversation to another")
            cursor += len(before)
            following = shaped.split("\ue000", 1)[0]  # template text up to the next content (or the end)
            for inserted in (message["content"], message["content"].strip()):
                if text.startswith(inserted, cursor) and text.startswith(following, cursor + len(inserted)):
                    break
            else:
                raise TokenizerError("the chat template changes message contents; it cannot be encoded with "
                                     "contents kept as text")
            ids += self.encode(before, allow_special=True)
            for index, piece in enumerate(inserted.split(MEDIA_MARK)):  # text, then a media part's ids, ...
                ids += (media.pop(0) if index else []) + self.encode(piece)
            cursor += len(inserted)
        if text[cursor:] != shaped:
            raise TokenizerError("the chat template renders differently from one conversation to another")
        return ids + self.encode(shaped, allow_special=True)

    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical tokenizer.json content; equal tokenizers have equal fingerprints."""
        canonical = json.dumps(json.loads(self._special.to_str()), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()[:12]})"


def _raise_exception(message: str):
    raise TokenizerError(message)


@functools.lru_cache(maxsize=16)
def _compiled_template(source: str):
    """A chat template compiled once (compiling costs far more than rendering)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The same environment settings transformers uses, so both render identically.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise_exception
    try:
        return environment.from_string(source)
    except jinja2.TemplateError as error:
        raise TokenizerError(f"chat template is invalid ({error}) — fix 'chat_template' in {CONFIG_FILE}") from None


def _render_media(messages: list[dict]) -> tuple[list[dict], list[list[int]]]:
    """Messages whose content is a list of parts (strings, and lists of ids: already encoded media) as the template
    sees them: the parts joined, each media part as MEDIA_MARK; and the media parts' ids in order."""
    rendered, media = [], []
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            if isinstance(content, str) and MEDIA_MARK in content:
                raise TokenizerError(f"chat message {index} holds U+E002, a private-use character fmforge "
                                     "reserves; remove it")
            rendered.append(message)
            continue
        pieces = []
        for part in content:
            if isinstance(part, str):
                if MEDIA_MARK in part:
                    raise TokenizerError(f"chat message {index} holds U+E002, a private-use character fmforge "
                                         "reserves; remove it")
                pieces.append(part)
            elif isinstance(part, list) and all(isinstance(i, int) for i in part):
                pieces.append(MEDIA_MARK)
                media.append(part)
            else:
                raise TokenizerError(f"chat message {index}: a content part must be text or encoded media")
        rendered.append({**message, "content": "".join(pieces)})
    return rendered, media


def post_processor_prefix(rust_tokenizer: RustTokenizer) -> str | None:
    """The token that tokenizer.json's post-processor puts before every sequence (Llama's "<s>", Llama 3's
    "<|begin_of_text|>"), or None when it adds none: what transformers' `tokenizer(text)` prepends."""
    if rust_tokenizer.post_processor is None:
        return None
    plain = rust_tokenizer.encode("a", add_special_tokens=False).ids
    full = rust_tokenizer.encode("a", add_special_tokens=True).ids
    return rust_tokenizer.id_to_token(full[0]) if full[1:len(plain) + 1] == plain and len(full) > len(plain) else None


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, *, progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`; ids 0..len(SPECIAL_TOKENS)-1 are SPECIAL_TOKENS.

    The result may have fewer than `vocab_size` ids when the corpus has too few distinct merges.
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise TokenizerError(f"vocab_size {vocab_size} is too small — use at least {minimum} "
                             f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    seen = 0

    def counted(items: Iterable[str]):
        nonlocal seen
        for text in items:
            if text:
                seen += 1
                yield text

    rust.train_from_iterator(counted(texts), trainer=trainer)
    if seen == 0:
        raise TokenizerError("no text to train the tokenizer on — check the corpus sources")
    return Tokenizer(rust)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
