"""Tokenizer: BOS rules from tokenizer_config.json, chat templates, incremental decoding."""

import json
import shutil

import pytest

from deepseek_fp4_plugin.tiny import build_tokenizer, tokenizer_config
from deepseek_fp4_plugin.tokenizer import Tokenizer

TEXT = "The sea is wide. 深度学习模型的权重 — café, naïve, 42°C, 🙂!"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(2048)))
    return d


def variant(folder, tmp_path, **changes):
    d = tmp_path / "v"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer(d)


def test_bos_rules(folder, tmp_path):
    tok = Tokenizer(folder)
    bos = tok.bos_token_id
    plain = tok._tok.encode(TEXT, add_special_tokens=False).ids
    assert tok.encode(TEXT) == [bos] + plain                      # add_bos_token: true, added once
    assert tok.encode(TEXT, add_bos=False) == plain
    off = variant(folder, tmp_path, add_bos_token=False)
    assert off.encode(TEXT) == plain and off.encode(TEXT, add_bos=True) == [bos] + plain
    shutil.rmtree(tmp_path / "v")
    # no add_bos_token: tokenizer.json's post-processor decides (this one adds BOS)
    unset = variant(folder, tmp_path, add_bos_token=None)
    assert unset.encode(TEXT) == [bos] + plain


def test_decode_round_trip(folder):
    tok = Tokenizer(folder)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode(tok.encode(TEXT), skip_special_tokens=False) == tok.bos_token + TEXT


def test_incremental_decoder_pieces_add_up(folder):
    tok = Tokenizer(folder)
    ids = tok.encode(TEXT, add_bos=False)
    dec = tok.decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == TEXT
    # multi-byte characters span byte-level tokens: no piece shows a half character
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0


def test_chat_template(folder, tmp_path):
    tok = Tokenizer(folder)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(msgs)
    assert text == (tok.bos_token + "Be brief." + "<｜User｜>Hi" + "<｜Assistant｜>Hello" + tok.eos_token
                    + "<｜User｜>Bye" + "<｜Assistant｜>")
    assert tok.apply_chat_template("Hi", add_generation_prompt=False) == tok.bos_token + "<｜User｜>Hi"
    ids = tok.encode_chat(msgs)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    with pytest.raises(ValueError, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="messages"):
        tok.apply_chat_template([{"content": "no role"}])


def test_chat_template_sources(folder, tmp_path):
    templates = [{"name": "tool_use", "template": "T"},
                 {"name": "default", "template": "D{{ messages[0].content }}"}]
    named = variant(folder, tmp_path, chat_template=templates)
    assert named.apply_chat_template("x") == "Dx"
    shutil.rmtree(tmp_path / "v")
    none = variant(folder, tmp_path, chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        none.apply_chat_template("x")
    (tmp_path / "v" / "chat_template.jinja").write_text("J{{ messages[0].content }}{{ bos_token }}")
    assert Tokenizer(tmp_path / "v").apply_chat_template("y") == "Jy" + none.bos_token


def test_missing_or_broken_files(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(tmp_path)
    assert Tokenizer.from_dir(tmp_path) is None
    d = tmp_path / "bad"
    shutil.copytree(folder, d)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer(d)
    with pytest.raises(ValueError, match="string"):
        Tokenizer(folder).encode(123)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "chat_template.jinja"])
def test_non_utf8_files_named(folder, tmp_path, name):
    d = tmp_path / "bad"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]   # so chat_template.jinja is read
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / name).write_bytes(b'{"bos_token": "\xff\xfe"}')
    with pytest.raises(ValueError, match=rf"{d / name}: not UTF-8"):
        Tokenizer(d)
