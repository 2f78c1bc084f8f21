from transformers import CLIPTokenizer

from hfi_core.toyworld.render import COLORS, PHRASES, SHAPES, caption
from hfi_core.toyworld.tokenizer import build_tokenizer, world_words


def test_every_world_word_is_one_token(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    words = world_words()
    assert {"stripe", "triangle", "zebra", "barcode", "polka", "circus"} <= set(words)
    assert {w: tok.tokenize(w) for w in words} == {w: [w + "</w>"] for w in words}


def test_captions_encode_one_id_per_word_between_bos_and_eos(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    for p in PHRASES:
        text = caption("green", "triangle", p)
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == len(text.split()) + 2
        assert tok.decode(ids, skip_special_tokens=True).strip() == text


def test_unknown_words_still_tokenize_byte_by_byte(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    pieces = tok.tokenize("stripy")
    assert len(pieces) > 1 and "".join(pieces).replace("</w>", "") == "stripy"


def test_saved_tokenizer_reloads_with_identical_ids_and_sd_padding(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    texts = [caption(c, s, "with polka dots") for c in COLORS for s in SHAPES]
    assert again(texts).input_ids == tok(texts).input_ids
    padded = again(texts[0], padding="max_length").input_ids
    assert len(padded) == again.model_max_length == 20
    assert padded[-1] == again.pad_token_id == again.eos_token_id  # SD v1.4 pads with <|endoftext|>
    assert (tmp_path / "tok" / "vocab.json").exists() and (tmp_path / "tok" / "merges.txt").exists()


def test_prompts_over_the_context_are_cut_to_what_truncation_keeps(tmp_path):
    from hfi_core.models import cut_prompts

    tok = build_tokenizer(tmp_path / "tok")
    long = " ".join(["a red circle with polka dots"] * 20)  # 120 words, over 77 tokens
    short = "a blue square like a barcode"
    cut, same = cut_prompts(tok, [long, short])
    assert same == short and len(tok(cut).input_ids) == tok.model_max_length
    assert tok(cut).input_ids == tok(long, truncation=True, max_length=tok.model_max_length).input_ids
