"""Tokenizer: train, round-trip any text, special tokens, chat template, save/load, Hugging Face parity."""

import json
import pickle
import random

import pytest

from fmforge.data.sources import stdlib_files
from fmforge.errors import TokenizerError
from fmforge.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, train_tokenizer

HARD_CASES = [
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "\t\ttabs\tinside",
    "windows\r\nline\r\nends\r\n",
    "lone\rcarriage return",
    "\n\n\n",
    "emoji 😀👍🏽 and a family 👩‍👩‍👧‍👦",
    "CJK 中文字符 日本語 한국어",
    "combining e\u0301 a\u0308\u0304 and Z\u0335\u0321\u0330",
    "control \x00\x01\x1b[31m\x7f chars",
    "\ufeffbyte order mark",
    "zero\u200bwidth\u200djoiner",
    "right-to-left \u202eעברית العربية",
    "private use \ue000 and plane 16 \U0010fffd",
    "replacement char \ufffd itself",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|eos|> <|end|><|user|> <|not_a_token|> <|",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    files = [p for p in stdlib_files() if p.parent.name == "json" or p.name in {"textwrap.py", "string.py"}]
    return [p.read_text(encoding="utf-8") for p in files] + HARD_CASES


@pytest.fixture(scope="module")
def tokenizer(corpus) -> Tokenizer:
    return train_tokenizer(corpus, vocab_size=600)


def random_text(rng: random.Random, max_length: int = 40) -> str:
    """Code points from several Unicode planes (surrogates excluded: they cannot appear in valid UTF-8)."""
    characters = []
    for _ in range(rng.randint(0, max_length)):
        plane = rng.choice([0, 0, 0, 1, 2, 14, 15, 16])
        code_point = rng.randrange(plane * 0x10000, (plane + 1) * 0x10000) if plane else rng.randrange(0x10000)
        if not 0xD800 <= code_point <= 0xDFFF:
            characters.append(chr(code_point))
    return "".join(characters)


def test_special_tokens_sit_at_their_documented_ids(tokenizer):
    assert [tokenizer.token_id(token) for token in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.token_id("<|end|>") == 6
    assert tokenizer.special_tokens() == SPECIAL_TOKENS
    assert tokenizer.vocab_size == 600  # special tokens included
    with pytest.raises(TokenizerError, match="not in this tokenizer"):
        tokenizer.token_id("<|nope|>")


@pytest.mark.parametrize("text", HARD_CASES)
def test_round_trip_hard_cases(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, allow_special=True)) == text


def test_round_trip_random_unicode(tokenizer):
    rng = random.Random(1234)
    texts = [random_text(rng) for _ in range(2000)]
    assert [tokenizer.decode(ids) for ids in tokenizer.encode_batch(texts)] == texts
    for text in texts[:200]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_batch_matches_encode(tokenizer, corpus):
    assert tokenizer.encode_batch(corpus[:5]) == [tokenizer.encode(text) for text in corpus[:5]]


def test_special_token_strings_in_text_stay_text_unless_allowed(tokenizer):
    end = tokenizer.token_id("<|end|>")
    assert end not in tokenizer.encode("hello<|end|>")
    assert tokenizer.encode("hello<|end|>", allow_special=True)[-1] == end
    assert tokenizer.decode(tokenizer.encode("a<|end|>b", allow_special=True), skip_special_tokens=True) == "ab"


def test_add_bos_prepends_bos(tokenizer):
    assert tokenizer.encode("x = 1", add_bos=True) == [tokenizer.bos_id, *tokenizer.encode("x = 1")]
    assert tokenizer.encode("", add_bos=True) == [tokenizer.bos_id]


def test_chat_template_renders_roles_and_generation_prompt(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n"
                    "<|assistant|>\nHello.<|end|>\n<|assistant|>\n")
    assert tokenizer.apply_chat_template(messages[1:2]) == "<|bos|><|user|>\nHi<|end|>\n"
    ids = tokenizer.encode(text, allow_special=True)
    assert ids[:2] == [tokenizer.bos_id, tokenizer.token_id("<|system|>")]
    assert ids[-2:] == [tokenizer.token_id("<|assistant|>"), tokenizer.encode("\n")[0]]
    assert tokenizer.decode(ids) == text


def test_chat_template_rejects_unknown_role_and_bad_messages(tokenizer):
    with pytest.raises(TokenizerError, match="unknown chat role bot"):
        tokenizer.apply_chat_template([{"role": "bot", "content": "hi"}])
    with pytest.raises(TokenizerError, match="string 'content'"):
        tokenizer.apply_chat_template([{"role": "user"}])


def test_save_load_keeps_everything_and_fingerprint(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.chat_template == CHAT_TEMPLATE
    text = "for i in range(10):\n\tprint(i)  # 😀"
    assert loaded.encode(text) == tokenizer.encode(text)
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    assert Tokenizer.load(tmp_path / "again").fingerprint() == tokenizer.fingerprint()
    assert not [p for p in (tmp_path / "tok").iterdir() if p.name.startswith(".")]  # no temp files left


def test_pickle_goes_through_json(tokenizer):
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.fingerprint() == tokenizer.fingerprint()
    assert copy.encode("<|end|> x", allow_special=True) == tokenizer.encode("<|end|> x", allow_special=True)


def test_fingerprint_tells_tokenizers_apart(corpus, tokenizer):
    assert train_tokenizer(corpus, vocab_size=650).fingerprint() != tokenizer.fingerprint()
    assert train_tokenizer(corpus, vocab_size=600).fingerprint() == tokenizer.fingerprint()  # training is deterministic


def test_load_errors_name_the_file(tokenizer, tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        Tokenizer.load(tmp_path)
    tokenizer.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is corrupt"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer_config.json not found"):
        Tokenizer.load(tmp_path)
    tokenizer.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(TokenizerError, match="tokenizer.json is corrupt"):
        Tokenizer.load(tmp_path)


def test_training_rejects_tiny_vocab_and_empty_corpus():
    with pytest.raises(TokenizerError, match="too small — use at least 272"):
        train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer(iter([]), vocab_size=300)


def test_config_is_what_transformers_expects(tokenizer, tmp_path):
    tokenizer.model_max_length = 256
    try:
        tokenizer.save(tmp_path)
    finally:
        tokenizer.model_max_length = None
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["model_max_length"] == 256
    assert Tokenizer.load(tmp_path).model_max_length == 256


def test_autotokenizer_loads_it_and_agrees(tokenizer, corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == tokenizer.vocab_size
    rng = random.Random(7)
    # transformers always matches special-token strings in text, i.e. our allow_special=True.
    texts = [*HARD_CASES, corpus[0][:2000], *(random_text(rng) for _ in range(50))]
    for text in texts:
        ids = tokenizer.encode(text, allow_special=True)
        assert hf(text, add_special_tokens=True)["input_ids"] == ids, text
        assert hf.decode(ids) == tokenizer.decode(ids)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
