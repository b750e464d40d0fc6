"""Tiny tokenizers and configs shared by tests/test_rewards*.py (no downloads), and a check of them."""

from __future__ import annotations

from tokenizers.pre_tokenizers import ByteLevel
from transformers import BertTokenizer, CLIPTokenizer

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A real byte-level BPE CLIP tokenizer without merges: one token per character (514 tokens, eos highest)."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


CLIP_VOCAB = 514


def tiny_bert_tokenizer(with_blip_tokens: bool = True) -> BertTokenizer:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "blue", "car", "the", "on"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    if with_blip_tokens:
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


BERT_VOCAB = 17  # 15 words + [DEC] + [ENC]


def tiny_clip_config(context: int = 16) -> dict:
    return dict(
        projection_dim=16,
        text_config=dict(vocab_size=CLIP_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=context, hidden_act="gelu", bos_token_id=512, eos_token_id=513, pad_token_id=513),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                           patch_size=8, hidden_act="gelu"),
    )


def tiny_blip_configs() -> tuple[dict, dict]:
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                  hidden_act="gelu", layer_norm_eps=1e-6)
    text = dict(vocab_size=BERT_VOCAB, hidden_size=24, encoder_hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=40, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
                bos_token_id=15, sep_token_id=3, eos_token_id=3, is_decoder=True)
    return vision, text


def tiny_aesthetic_vision_config() -> dict:
    return dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                projection_dim=16, hidden_act="quick_gelu")


def test_tiny_tokenizers_are_complete():
    """The fixtures themselves: full vocabularies, eos at the highest id (OpenCLIP pools at argmax)."""
    clip = tiny_clip_tokenizer()
    assert len(clip) == CLIP_VOCAB and clip.eos_token_id == CLIP_VOCAB - 1 and clip.bos_token_id == CLIP_VOCAB - 2
    ids = clip("a red cat")["input_ids"]
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id and len(ids) == 2 + len("a red cat".replace(" ", ""))
    bert = tiny_bert_tokenizer()
    assert len(bert) == BERT_VOCAB
    assert bert("a photo of a cat")["input_ids"] == [2, 5, 6, 7, 5, 8, 3]
