"""Incremental detokenizer and stop strings against full decodes and a brute-force oracle."""

from __future__ import annotations

import json
import random

import pytest

from server.detokenizer import (
    REPLACEMENT,
    DetokenizerWithStops,
    IncrementalDetokenizer,
    StopStringChecker,
)
from server.sampling_params import SamplingParams

MULTIBYTE = "Unicode text: café, naïve, 東京 and 🙂 ok. The quick brown fox 🙂🙂 東"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def byte_token_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte, so that every multi-byte character spans several tokens."""
    ids = [tok.convert_tokens_to_ids(_byte_char(b)) for b in text.encode()]
    assert all(isinstance(i, int) and i >= 3 for i in ids)
    return ids


def _byte_char(b: int) -> str:
    # GPT-2's byte -> unicode table.
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    if b in printable:
        return chr(b)
    return chr(256 + sorted(set(range(256)) - set(printable)).index(b))


def stream(det: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Feed ids in random chunks of 1-3; return the deltas, flush last."""
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        deltas.append(det.add_tokens(ids[i:i + n]))
        i += n
    deltas.append(det.flush())
    return deltas


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_join_to_full_decode(tok, skip):
    rng = random.Random(0)
    prompt_ids = tok.encode("The quick brown fox")
    for trial in range(150):
        n = rng.randint(1, 40)
        ids = [rng.randrange(3, len(tok)) if rng.random() > 0.1 else rng.randrange(3)
               for _ in range(n)]
        prompt = prompt_ids if trial % 2 else []
        det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        deltas = stream(det, ids, rng)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), ids


def test_multibyte_characters_never_emit_replacement_mid_stream(tok):
    rng = random.Random(1)
    normal = tok.encode(MULTIBYTE)
    byte_ids = byte_token_ids(tok, MULTIBYTE)
    assert tok.decode(byte_ids) == MULTIBYTE
    assert len(byte_ids) > len(MULTIBYTE)  # really multi-byte chars split over tokens
    for ids in (normal, byte_ids, byte_ids[:3] + normal + byte_ids[-4:]):
        assert REPLACEMENT not in tok.decode(ids)
        for _ in range(10):
            det = IncrementalDetokenizer(tok, tok.encode("Prompt:"))
            deltas = stream(det, ids, rng)
            assert all(REPLACEMENT not in d for d in deltas)
            assert deltas[-1] == ""  # valid text: nothing left for flush
            assert "".join(deltas) == tok.decode(ids)


def test_incomplete_character_is_held_and_flushed(tok):
    emoji = byte_token_ids(tok, "🙂")
    assert len(emoji) == 4
    det = IncrementalDetokenizer(tok, [])
    assert det.add_tokens(tok.encode("ok ")) == "ok "
    assert [det.add_tokens([t]) for t in emoji[:3]] == ["", "", ""]
    assert det.add_tokens(emoji[3:] + tok.encode("!")) == "🙂!"
    det.add_tokens(emoji[:2])
    assert det.flush() == tok.decode(emoji[:2]) and det.flush() == ""


def test_decoding_window_stays_small(tok):
    class Counting:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens=True, **kwargs):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = Counting()
    ids = byte_token_ids(tok, MULTIBYTE) * 10
    det = IncrementalDetokenizer(counting, tok.encode("a long prompt " * 20))
    out = "".join(det.add_tokens([t]) for t in ids) + det.flush()
    assert out == MULTIBYTE * 10
    assert counting.longest <= 8


def _sentencepiece_like():
    """A Llama-style tokenizer: '▁' for spaces, byte fallback, decoder strips one space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    corpus = ["Hello there, how are you today? The quick brown fox jumps over the lazy dog."]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(corpus * 4, trainer=trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    merges = [tuple(m) for m in model["merges"]]
    sp = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    sp.normalizer = tok.normalizer
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    sp.add_special_tokens(["<unk>", "<s>", "</s>"])
    return sp


def test_sentencepiece_like_tokenizer_keeps_leading_spaces_and_bytes():
    sp = _sentencepiece_like()
    text = "Hello there, café 東京 🙂 how are you? The lazy dog 🙂."
    ids = sp.encode(text).ids
    assert sp.decode(ids) == text
    assert any(sp.id_to_token(i).startswith("<0x") for i in ids)  # byte fallback in use
    rng = random.Random(2)
    for split in range(len(ids)):
        prompt, output = ids[:split], ids[split:]
        det = IncrementalDetokenizer(sp, prompt)
        deltas = stream(det, output, rng)
        if sp.decode(prompt).endswith(REPLACEMENT):
            # The prompt ends inside a character: the output is decoded on its own.
            assert "".join(deltas) == sp.decode(output), split
            continue
        assert all(REPLACEMENT not in d for d in deltas)
        # In context: the completion keeps the space the full text has there.
        assert sp.decode(prompt) + "".join(deltas) == text, split


def brute_force_stop(text: str, stops: list[str], include: bool, gate: int
                     ) -> tuple[str, str | None]:
    """Oracle: the stop whose first occurrence ending after `gate` ends first (longest on ties)."""
    best = None
    for s in stops:
        for i in range(len(text) - len(s) + 1):
            if text.startswith(s, i) and i + len(s) > gate:
                key = (i + len(s), -len(s))
                if best is None or key < best[0]:
                    best = (key, i, s)
                break
    if best is None:
        return text, None
    _, i, s = best
    return (text[:i + len(s)] if include else text[:i]), s


def feed_chunks(checker: StopStringChecker, chunks: list[str], gated: int
                ) -> tuple[list[str], str | None]:
    outs, stop = [], None
    for j, c in enumerate(chunks):
        out, stop = checker.feed(c, check=j >= gated)
        outs.append(out)
        if stop is not None:
            return outs, stop
    outs.append(checker.flush())
    return outs, None


def test_stop_checker_matches_brute_force_for_any_chunking():
    rng = random.Random(3)
    for _ in range(3000):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 14)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 3))]
        include = rng.random() < 0.5
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)], strict=True)]
        gated = rng.randint(0, 2) if rng.random() < 0.3 else 0
        gate = sum(len(c) for c in chunks[:gated])
        outs, stop = feed_chunks(StopStringChecker(stops, include), chunks, gated)
        exp_text, exp_stop = brute_force_stop(text, stops, include, gate)
        assert ("".join(outs), stop) == (exp_text, exp_stop), (text, stops, include, chunks)
        # Never emits what later turns out to be cut: every prefix of outputs is a prefix.
        for k in range(len(outs)):
            assert exp_text.startswith("".join(outs[:k + 1]))


def test_stop_checker_cases():
    c = StopStringChecker(["STOP"])
    assert c.feed("hello ST") == ("hello ", None)  # "ST" could begin STOP: held
    assert c.feed("OR") == ("STOR", None)
    assert c.feed("x STO") == ("x ", None)
    assert c.feed("P and more") == ("", "STOP")
    assert c.feed("again") == ("", None) and c.flush() == ""

    c = StopStringChecker(["STOP"], include_stop_str_in_output=True)
    assert c.feed("ab ST") == ("ab ST", None)
    assert c.feed("OP tail") == ("OP", "STOP")

    # At the very start; overlapping candidates: the one completing first wins.
    assert StopStringChecker(["The"]).feed("The end") == ("", "The")
    assert StopStringChecker(["abcd", "bc"]).feed("xabcd") == ("xa", "bc")
    assert StopStringChecker(["c", "bc"]).feed("abc") == ("a", "bc")
    c = StopStringChecker(["abc", "b"])
    assert c.feed("a") == ("", None)
    assert c.feed("bc") == ("a", "b")

    c = StopStringChecker(["<|end|>"])
    assert c.feed("x <|en") == ("x ", None)
    assert c.flush() == "<|en"


def test_detokenizer_with_stops_spanning_tokens_and_min_tokens(tok):
    text = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    ids = tok.encode(text)
    assert not any("n fox j" in tok.decode([i]) for i in ids)  # the stop spans tokens

    def run(params: SamplingParams) -> tuple[list[str], str | None, int]:
        det = DetokenizerWithStops(tok, tok.encode("Prompt"), params)
        deltas, stop = [], None
        for n, t in enumerate(ids, start=1):
            d, stop = det.update([t], n)
            deltas.append(d)
            if stop is not None:
                return deltas, stop, n
        deltas.append(det.flush())
        return deltas, None, len(ids)

    deltas, stop, n = run(SamplingParams(stop=["n fox j"]))
    assert stop == "n fox j" and "".join(deltas) == "The quick brow"
    # Stopped at the very token that completed the stop string.
    assert "n fox j" in tok.decode(ids[:n]) and "n fox j" not in tok.decode(ids[:n - 1])
    deltas, stop, _ = run(SamplingParams(stop=["fox"], include_stop_str_in_output=True))
    assert (stop, "".join(deltas)) == ("fox", "The quick brown fox")
    # min_tokens: the first "fox" comes too early; the second one stops the request.
    first_fox = next(k for k in range(1, len(ids) + 1) if "fox" in tok.decode(ids[:k]))
    deltas, stop, _ = run(SamplingParams(stop=["fox"], min_tokens=first_fox + 1, max_tokens=64))
    assert (stop, "".join(deltas)) == ("fox", text[:text.rindex("fox")])
    deltas, stop, _ = run(SamplingParams(stop=["cat"]))
    assert stop is None and "".join(deltas) == text


def test_detokenizer_with_stops_multi_token_update_and_flush(tok):
    ids = tok.encode("Hello STOP world")
    det = DetokenizerWithStops(tok, [], SamplingParams(stop=["STOP"]))
    assert det.update(ids, len(ids)) == ("Hello ", "STOP")
    assert det.update(tok.encode(" more"), len(ids) + 2) == ("", None)
    assert det.flush() == "" and det.stop_reason == "STOP" and det.output_text == "Hello "

    # The held-back partial stop comes out at flush; incomplete bytes too.
    emoji = byte_token_ids(tok, "🙂")
    det = DetokenizerWithStops(tok, [], SamplingParams(stop=["STOP"]))
    ids = tok.encode("wait ST") + emoji[:2]
    assert det.update(ids, len(ids)) == ("wait ", None)
    assert det.flush() == "ST" + tok.decode(emoji[:2])
    assert det.stop_reason is None
