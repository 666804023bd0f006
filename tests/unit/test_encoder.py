import torch

from sgmodel.conditioning import encode_graphs
from sgmodel.graph import SceneGraph, SGObject


def test_condition_shapes_and_masks(tiny_pipe, graphs):
    cond = tiny_pipe.encode(graphs)
    g, length, dim = cond.context.shape
    assert g == 3 and dim == tiny_pipe.unet.config.cross_attention_dim
    # global + objects + triples (+ caption tokens for the graph that has one)
    assert cond.mask[0, :1].all()
    assert cond.mask[0].sum() == 1 + 2 + 1
    assert cond.mask[1].sum() == 1 + 1  # no relations: global + one object
    assert cond.mask[2].sum() > 1 + 3 + 2  # + caption tokens
    assert cond.global_.shape == (3, tiny_pipe.graph_encoder.config.graph_dim)


def test_encoding_of_a_graph_does_not_depend_on_its_batch(tiny_pipe, graphs):
    together = tiny_pipe.encode(graphs)
    alone = tiny_pipe.encode([graphs[1]])
    n = int(alone.mask[0].sum())
    torch.testing.assert_close(together.context[1][together.mask[1]], alone.context[0][:n], atol=1e-5, rtol=1e-5)


def test_relations_change_object_features(tiny_pipe, graphs):
    with_rel = graphs[0]
    without = SceneGraph(id="x", objects=with_rel.objects)
    a = tiny_pipe.encode([with_rel]).context[0, 1:3]
    b = tiny_pipe.encode([without]).context[0, 1:3]
    assert not torch.allclose(a, b)


def test_attributes_change_node_features(tiny_pipe):
    red = SceneGraph(id="r", objects=(SGObject("circle", ("red",)),))
    blue = SceneGraph(id="b", objects=(SGObject("circle", ("blue",)),))
    enc = [encode_graphs([g], tiny_pipe.text_embedder, tiny_pipe.graph_encoder, tiny_pipe.conditioner) for g in (red, blue)]
    assert not torch.allclose(enc[0].context, enc[1].context)


def test_input_graphs_are_not_mutated(tiny_pipe, graphs):
    before = [repr(g) for g in graphs]
    tiny_pipe.encode(graphs)
    assert [repr(g) for g in graphs] == before


def test_graph_convolution_leaves_no_generated_files_in_the_temp_dir(tmp_path):
    # torch-geometric writes each MessagePassing class's generated propagate() to the temp dir; a
    # fresh process with its own TMPDIR shows whether the file stays behind.
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from sgmodel.encoder import TripleConv\n"
        "conv = TripleConv(8, 16)\n"
        "nodes, triples = conv(torch.randn(3, 8), torch.randn(2, 8), torch.tensor([[0, 1], [1, 2]]))\n"
        "assert nodes.shape == (3, 8) and triples.shape == (2, 8)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
