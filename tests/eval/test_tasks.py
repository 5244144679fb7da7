from dashkv import corpus
from dashkv.eval.tasks import passkey


def test_corpus_splits_are_disjoint_real_prose():
    train, held_out = set(corpus.paragraphs("train")), set(corpus.paragraphs("eval"))
    assert len(train) > 200 and len(held_out) > 200
    assert not train & held_out
    assert all(" " in p and not p.startswith(" ") for p in held_out)


def test_passkey_format_and_determinism(default_model):
    _, tok = default_model
    a, b = passkey.make_sample(tok, 1000, seed=3), passkey.make_sample(tok, 1000, seed=3)
    assert a == b
    needle = passkey.NEEDLE.format(key=a.answer)
    assert f"\n\n{needle}\n\n" in a.context  # the needle is its own paragraph
    assert a.question.endswith(passkey.ANSWER_PREFIX) and a.question.endswith(" ")
    assert 800 < len(tok(a.context).input_ids) <= 1000
    assert passkey.score(f" {a.answer}. Remember", a.answer) == 1.0
    assert passkey.score("12345", a.answer) == 0.0
