import torch

from sgmodel.text import TextEmbedder


def make_embedder(pipe, **kw) -> TextEmbedder:
    return TextEmbedder(pipe.text_encoder, pipe.tokenizer, pooling="mean", **kw)


def test_encodes_each_distinct_string_once(tiny_pipe):
    text = make_embedder(tiny_pipe)
    batch = ["circle", "red", "circle", "square", "red", "circle"]
    out = text.embed(batch)
    assert out.shape == (6, text.dim)
    assert text.encoder_calls == 3 and text.strings_encoded == 3
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[4])
    assert not torch.allclose(out[0], out[1])
    text.embed(["square", "circle"])  # all cached: no new call
    assert text.encoder_calls == 3
    text.embed(["circle", "blue"])  # only the new string goes through the model
    assert text.encoder_calls == 4 and text.strings_encoded == 4


def test_a_strings_vector_does_not_depend_on_its_batch_or_history(tiny_pipe):
    alone = make_embedder(tiny_pipe).embed(["left of"])[0]
    crowded = make_embedder(tiny_pipe)
    crowded.embed(["a much longer phrase than the others", "blue"])
    got = crowded.embed(["blue", "left of", "above the big green thing"])[1]
    assert torch.equal(alone, got)  # bit for bit: reruns of a job must give identical images


def test_cached_equals_uncached(tiny_pipe):
    cached = make_embedder(tiny_pipe).embed(["left of", "blue"])
    direct = make_embedder(tiny_pipe).embed(["left of", "blue"], use_cache=False)
    torch.testing.assert_close(cached, direct)


def test_cache_is_bounded_and_survives_batches_larger_than_it(tiny_pipe):
    text = make_embedder(tiny_pipe, cache_size=2)
    words = ["circle", "square", "triangle", "red", "green"]
    out = text.embed(words)
    assert out.shape[0] == 5
    assert len(text._cache) <= 2
    torch.testing.assert_close(out, make_embedder(tiny_pipe).embed(words))


def test_eos_pooling_and_caption_tokens(tiny_pipe):
    text = TextEmbedder(tiny_pipe.text_encoder, tiny_pipe.tokenizer, pooling="eos")
    assert text.embed(["circle"]).shape == (1, text.dim)
    hidden, mask = text.embed_tokens(["a red ball", "circle"])
    assert hidden.shape[:2] == mask.shape and mask[0].sum() > mask[1].sum()
